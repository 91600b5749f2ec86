/*
 * f2pipe's Mosquitto plugin: the broker refuses every retained PUBLISH.
 *
 * Mosquitto's ACL file cannot tell a retained message from another, and its
 * only switch (retain_available false) also stops the broker retaining its own
 * $SYS counters. A retained message from a device would stay in the broker's
 * memory until deleted, one per topic, so a device could hoard memory that no
 * queue bound covers. No f2pipe client publishes retained messages.
 *
 * Loaded with `plugin <path to the built .so>` before `acl_file`: Mosquitto
 * asks the plugins' ACL checks first, in the order they were loaded, and takes
 * the first answer that is not "defer". This check answers "denied" for a
 * retained write (a PUBLISH, or a will when it is sent) and defers every other
 * check to the ACL file. Built by f2pipe.operations.stack.retainguard.
 */
#include <stddef.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

static mosquitto_plugin_id_t *plugin_id = NULL;

static int on_acl_check(int event, void *event_data, void *userdata)
{
	const struct mosquitto_evt_acl_check *check = event_data;

	(void)event;
	(void)userdata;
	if(check->access == MOSQ_ACL_WRITE && check->retain){
		return MOSQ_ERR_ACL_DENIED;
	}
	return MOSQ_ERR_PLUGIN_DEFER;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5){
			return 5;
		}
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	plugin_id = identifier;
	return mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	return mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
}
