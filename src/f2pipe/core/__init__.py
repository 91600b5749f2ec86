"""The pure core: what an F2 message means, with no I/O.

Topics (:mod:`.topics`), Modbus frames and their CRC (:mod:`.frames`), decoding
a message into readings or one dead-letter reason (:mod:`.decode`,
:mod:`.reasons`), the boundary data models (:mod:`.models`) and the shape of a
dead letter (:mod:`.deadletter`). Nothing here imports a network, database or
broker client (a test enforces it), so every rule of the contract is checked
here with plain asserts and property tests.
"""
