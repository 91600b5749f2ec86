"""The fleet's metadata: the schema and its migrations (:mod:`.database`), fleet
documents with import and export (:mod:`.fleet`), and the processor's cached
lookups (:mod:`.resolver`)."""
