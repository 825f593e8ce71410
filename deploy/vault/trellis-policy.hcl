# The Vault / OpenBao policy Trellis's key backend needs (docs/vault.md).
# `trellis vault check` prints it for the configured mounts and key prefix.
# Rotating a Transit key is an operator's job: Trellis pins key versions and never does.

# create CA keys (exportable=false; a create is an update to Transit), read their public keys,
# delete keys that were never recorded
path "transit/keys/trellis-*" {
  capabilities = ["create", "read", "update", "delete"]
}

# set deletion_allowed just before deleting such a key
path "transit/keys/trellis-*/config" {
  capabilities = ["update"]
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
