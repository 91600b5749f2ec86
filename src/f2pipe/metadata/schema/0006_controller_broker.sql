-- The MQTT broker a controller belongs to (SPEC section 10): devices are spread over
-- several brokers, and each broker's ACL lets in only the controllers assigned to it.
-- NULL: the default broker (mqtt-1). Only a controller (a device with a MAC) has one.
-- Which names exist is configuration (F2PIPE_MQTT_BROKERS), checked by `fleet import`.
ALTER TABLE devices
    ADD COLUMN broker text
    CHECK (broker IS NULL OR (broker ~ '^mqtt-[1-9][0-9]?$' AND mac_address IS NOT NULL));
