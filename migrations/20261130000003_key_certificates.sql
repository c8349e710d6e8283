-- A key may stand for a client certificate instead of a secret: a caller that presents a
-- certificate from the API's client CA with this subject common name gets the key's roles and
-- scope (and is `cert:<subject>` in audit entries).
ALTER TABLE api_keys
    ADD COLUMN certificate_subject text
        CHECK (certificate_subject IS NULL OR length(certificate_subject) BETWEEN 1 AND 256);

CREATE UNIQUE INDEX api_keys_active_certificate ON api_keys (certificate_subject)
    WHERE revoked_at IS NULL AND certificate_subject IS NOT NULL;
