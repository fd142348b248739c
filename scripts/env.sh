# Sourced by every script (and by developers: `source scripts/env.sh`) so that cargo links
# tch against the project's virtualenv torch. Safe to source more than once.
TS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TS_ROOT
export TS_VENV="$TS_ROOT/.venv"
export TS_CACHE="$TS_ROOT/.cache"
case ":$PATH:" in
  *":$TS_VENV/bin:"*) ;;
  *) export PATH="$TS_VENV/bin:$PATH" ;;
esac
# torch-sys asks the venv's python where libtorch lives (.cargo/config.toml sets
# LIBTORCH_USE_PYTORCH=1 too; exported here for tools that bypass cargo's [env]).
export LIBTORCH_USE_PYTORCH=1
export VIRTUAL_ENV="$TS_VENV"
export TS_KAFKA_PORT="${TS_KAFKA_PORT:-19092}"
export TS_KAFKA_CONTROLLER_PORT="${TS_KAFKA_CONTROLLER_PORT:-19093}"
export TS_KAFKA_BROKERS="${TS_KAFKA_BROKERS:-127.0.0.1:$TS_KAFKA_PORT}"
# The schema registry scripts/registry starts (Apicurio Registry, Confluent-compatible API).
export TS_REGISTRY_PORT="${TS_REGISTRY_PORT:-28081}"
export TS_SCHEMA_REGISTRY_URL="${TS_SCHEMA_REGISTRY_URL:-http://127.0.0.1:$TS_REGISTRY_PORT/apis/ccompat/v7}"
