# The Vault / OpenBao policy Trellis's key backend needs (docs/vault.md).
# `trellis vault check` prints it for the configured mounts and key prefix.
# Rotating a Transit key is an operator's job: Trellis pins key versions and never does.

# create CA keys (exportable=false; a create is an update to Transit) and read their public keys;
# never delete one (deletion_allowed can only be false): keys no CA records (made by a failed init
# or rotation, or replaced by init --force) are left for an operator to delete, and Trellis names
# them. The trailing * also matches <key>/config, /trim, /rotate and /import_version, and a policy
# cannot take them out again (Vault applies only the most specific rule, and no rule is more
# specific for a key name of Trellis's choosing): the allowed parameters below are what keeps the
# token from making a key exportable, trimming or importing versions, or changing which versions
# may sign. A rotation (no parameters) stays possible and harms nothing: every CA pins its key
# version.
path "transit/keys/trellis-*" {
  capabilities = ["create", "read", "update"]
  allowed_parameters = {
    "type" = ["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519"]
    "exportable" = [false]
    "allow_plaintext_backup" = [false]
    "deletion_allowed" = [false]
  }
}

# every certificate, CRL and OCSP signature
path "transit/sign/trellis-*" {
  capabilities = ["update"]
}

# keys Trellis hands out (KV v2)
path "secret/data/trellis/*" {
  capabilities = ["create", "read", "update"]
}

# check the token (also in the default policy)
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

# renew the token (also in the default policy)
path "auth/token/renew-self" {
  capabilities = ["update"]
}

# trellis vault check and /readyz (also in the default policy)
path "sys/capabilities-self" {
  capabilities = ["update"]
}
