-- What each applied message id carried: md5 of its type and data (jsonb's canonical text), as
-- a uuid (16 bytes). A message id seen again with other content is a publisher's bug, not a
-- duplicate: it is dead-lettered ('id_reused') instead of being silently dropped. Rows from
-- before this column have no digest and keep being taken as duplicates.
ALTER TABLE processed_events ADD COLUMN digest uuid;
