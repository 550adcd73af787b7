-- The policy snapshot is only ever written and read whole, never queried inside, so it is kept as
-- json (the text as written, validated) instead of jsonb: parsing ~170 bytes into jsonb was a
-- fifth of the server's work per bulk-enqueued row. Payloads and metas stay jsonb, which
-- operators query with jsonb's operators and indexes. Rewrites the table once.
ALTER TABLE jobs ALTER COLUMN policy TYPE json USING policy::json;
ALTER TABLE jobs ALTER COLUMN policy SET DEFAULT '{}';
