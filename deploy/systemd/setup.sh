#!/usr/bin/env bash
# Prepare a host for the systemd units in this folder: the users, folders, configuration and environment files
# they expect, and the units themselves. Idempotent: run it again after `git pull` (units and NATS configs are
# replaced; configuration and secrets that exist are left alone). It enables and starts nothing.
#
#   sudo deploy/systemd/setup.sh nats   --secrets FILE [--routes HOST1,HOST2,HOST3]
#   sudo deploy/systemd/setup.sh agents --secrets FILE [--source DIR] [--admin] AGENT...
#
# nats     a NATS node: user nats; /etc/nats/ (the configs of deploy/nats/, tls/ for the route certificates),
#          /etc/nats/nats.env (every NATS_PW_*, NATS_ROUTE_PASSWORD, and NATS_ROUTE_1..3 built from --routes,
#          default nats-1,nats-2,nats-3), /data/jetstream; nats-server@.service.
# agents   agent processes: user dspyrt; /opt/dspyrt/.venv (with --source: the project pip-installed from DIR),
#          /var/lib/dspyrt, /etc/dspyrt/{dspyrt.toml,models.toml} (from the examples), /etc/dspyrt/env (shared:
#          OTEL_EXPORTER_OTLP_ENDPOINT, provider API keys), /etc/dspyrt/<agent>.env (its NATS user and password);
#          with --admin also /etc/dspyrt/admin.env for dspyrt-streams.service, which is masked on hosts without it.
#
# FILE holds KEY=VALUE lines as deploy/example.env does (NATS_PW_<USER>=..., NATS_ROUTE_PASSWORD=...): make one
# for the whole deployment with the command at the top of example.env, and copy it to each host over SSH.
# --root DIR installs under DIR instead of / and only prints what it would do to users and systemd (for tests,
# or to look before you leap).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
deploy="$(dirname "$here")"
root=""
secrets=""
source_dir=""
routes="nats-1,nats-2,nats-3"
admin=0
role=""
agents=()

usage() {
    sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

die() {
    echo "setup.sh: $*" >&2
    exit 2
}

note() {
    echo "setup.sh: $*"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --root) root="${2:?--root needs a folder}"; shift 2 ;;
        --secrets) secrets="${2:?--secrets needs a file}"; shift 2 ;;
        --source) source_dir="${2:?--source needs the project folder}"; shift 2 ;;
        --routes) routes="${2:?--routes needs HOST1,HOST2,HOST3}"; shift 2 ;;
        --admin) admin=1; shift ;;
        -h | --help) usage 0 ;;
        nats | agents)
            [ -z "$role" ] || die "one role at a time (nats or agents)"
            role="$1"; shift ;;
        -*) die "unknown option $1 (--help)" ;;
        *)
            [ "$role" = agents ] || die "unexpected $1: agent names follow 'agents'"
            agents+=("$1"); shift ;;
    esac
done

[ -n "$role" ] || usage >&2
[ -z "$secrets" ] || [ -r "$secrets" ] || die "cannot read the secrets file $secrets"
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
    die "run it as root (or with --root DIR to install under DIR)"
fi

# As root on the real system: change owners, create users, talk to systemd. Under --root: say so instead.
run() {
    if [ -n "$root" ]; then
        note "would run: $*"
    else
        "$@"
    fi
}

# make_dir PATH MODE OWNER:GROUP
make_dir() {
    install -d -m "$2" "$root$1"
    run chown "$3" "$root$1"
}

# put PATH MODE OWNER:GROUP < content   (always written: files this project owns)
put() {
    local target="$root$1" tmp
    tmp="$(mktemp "$(dirname "$target")/.setup.XXXXXX")"
    cat >"$tmp"
    chmod "$2" "$tmp"
    mv -f "$tmp" "$target"
    run chown "$3" "$target"
}

# keep PATH MODE OWNER:GROUP < content   (written only when missing: configuration and secrets are yours)
keep() {
    if [ -e "$root$1" ]; then
        cat >/dev/null
        note "kept $1"
    else
        put "$@"
        note "created $1"
    fi
}

# secret KEY: its value in the secrets file (empty when there is no file or no such key)
secret() {
    [ -n "$secrets" ] || return 0
    local key value
    while IFS='=' read -r key value; do
        if [ "$key" = "$1" ]; then
            printf '%s' "$value"
            return 0
        fi
    done <"$secrets"
}

# The password variable of NATS user $1: NATS_PW_<USER>, upper case, "-" -> "_" (deploy/nats/gen_accounts.py).
password_variable() {
    printf 'NATS_PW_%s' "$(printf '%s' "$1" | tr 'a-z-' 'A-Z_')"
}

system_user() {
    local user="$1" home="$2"
    if [ -n "$root" ]; then
        note "would run: useradd --system --user-group --home-dir $home --shell /usr/sbin/nologin $user"
    elif ! id -u "$user" >/dev/null 2>&1; then
        useradd --system --user-group --home-dir "$home" --shell /usr/sbin/nologin "$user"
        note "created user $user"
    fi
}

install_unit() {
    [ -d "$root/etc/systemd/system" ] || install -d -m 0755 "$root/etc/systemd/system"
    put "/etc/systemd/system/$1" 0644 root:root <"$here/$1"
}

# ---------------------------------------------------------------------------------------------------- nats

# The nats-servers' environment: every NATS_PW_* accounts.conf reads, the route password and the three route URLs.
nats_env() {
    local variable value route_password i=1 host hosts
    route_password="$(secret NATS_ROUTE_PASSWORD)"
    [ -n "$route_password" ] || die "$secrets has no NATS_ROUTE_PASSWORD"
    IFS=',' read -r -a hosts <<<"$routes"
    [ "${#hosts[@]}" -eq 3 ] || die "--routes needs three hosts, not '$routes'"
    echo "# The nats-servers' secrets (deploy/systemd/setup.sh): every user's password and the routes'."
    for variable in $(grep -oE '[$]NATS_PW_[A-Z0-9_]+' "$deploy/nats/accounts.conf" | tr -d '$' | sort -u); do
        value="$(secret "$variable")"
        [ -n "$value" ] || die "$secrets has no $variable (accounts.conf reads it)"
        echo "$variable=$value"
    done
    echo "NATS_ROUTE_PASSWORD=$route_password"
    for host in "${hosts[@]}"; do
        echo "NATS_ROUTE_$i=nats-route://route:$route_password@$host:6222"
        i=$((i + 1))
    done
}

setup_nats() {
    system_user nats /data/jetstream
    make_dir /etc/nats 0750 root:nats
    make_dir /etc/nats/tls 0750 root:nats
    make_dir /data/jetstream 0750 nats:nats  # (/data, when missing, is created 0755)
    local source name
    for source in "$deploy"/nats/*.conf; do
        name="$(basename "$source")"
        put "/etc/nats/$name" 0640 root:nats <"$source"
    done

    if [ -e "$root/etc/nats/nats.env" ]; then
        note "kept /etc/nats/nats.env"
    elif [ -z "$secrets" ]; then
        note "no /etc/nats/nats.env yet: run again with --secrets FILE"
    else
        local content
        content="$(nats_env)"  # first, whole: a missing secret stops here, before anything is written
        printf '%s\n' "$content" | put /etc/nats/nats.env 0600 root:root
        note "created /etc/nats/nats.env"
    fi

    local missing=()
    for name in ca.pem route.pem route-key.pem; do
        [ -e "$root/etc/nats/tls/$name" ] || missing+=("$name")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        note "for nats-tls-N.conf put ${missing[*]} in /etc/nats/tls/ (root:nats, key mode 0640; deploy/README.md)"
    fi
    if [ ! -x "$root/usr/local/bin/nats-server" ]; then
        note "no /usr/local/bin/nats-server: install the version deploy/compose.yaml names (deploy/README.md)"
    fi
    install_unit nats-server@.service
    run systemctl daemon-reload
    note "next: systemctl enable --now nats-server@nats-tls-N (N = this host's node)"
}

# -------------------------------------------------------------------------------------------------- agents

# login_env USER FILE: FILE (kept when it exists) with USER's NATS login, its password from the secrets file.
login_env() {
    local variable password
    variable="$(password_variable "$1")"
    password="$(secret "$variable")"
    if [ -z "$password" ] && [ ! -e "$root$2" ]; then
        note "no $variable in the secrets: set DSPYRT_NATS_PASSWORD in $2"
    fi
    printf 'DSPYRT_NATS_USER=%s\nDSPYRT_NATS_PASSWORD=%s\n' "$1" "$password" | keep "$2" 0600 root:root
}

setup_agents() {
    [ "${#agents[@]}" -gt 0 ] || [ "$admin" -eq 1 ] || die "name the agents this host runs (agents switcher ...)"
    system_user dspyrt /var/lib/dspyrt
    make_dir /opt/dspyrt 0755 root:root
    make_dir /var/lib/dspyrt 0750 dspyrt:dspyrt
    make_dir /etc/dspyrt 0750 root:dspyrt
    keep /etc/dspyrt/dspyrt.toml 0640 root:dspyrt <"$deploy/dspyrt.example.toml"
    keep /etc/dspyrt/models.toml 0640 root:dspyrt <"$deploy/models.example.toml"
    keep /etc/dspyrt/env 0600 root:root <<'EOF'
# Every dspyrt unit on this host reads this file (systemd reads it as root: mode 0600).
# Where spans and metrics go (OTLP/HTTP), e.g. the collector of deploy/otel/collector.yaml:
#OTEL_EXPORTER_OTLP_ENDPOINT=http://collector.internal:4318
#OTEL_RESOURCE_ATTRIBUTES=deployment.environment.name=production
# Provider API keys named by models.toml (api_key_env):
#OPENAI_API_KEY=
LITELLM_LOCAL_MODEL_COST_MAP=True
EOF

    local agent
    for agent in "${agents[@]}"; do
        login_env "$agent" "/etc/dspyrt/$agent.env"
    done
    if [ "$admin" -eq 1 ]; then
        login_env admin /etc/dspyrt/admin.env
    fi

    if [ -n "$source_dir" ]; then
        [ -e "$root/opt/dspyrt/.venv/bin/python" ] || run python3 -m venv "$root/opt/dspyrt/.venv"
        run "$root/opt/dspyrt/.venv/bin/pip" install --upgrade "$source_dir"
    elif [ ! -x "$root/opt/dspyrt/.venv/bin/dspyrt" ]; then
        note "no /opt/dspyrt/.venv/bin/dspyrt: run again with --source <the project folder> (or pip-install it there)"
    fi

    install_unit dspyrt-agent@.service
    install_unit dspyrt-streams.service
    run systemctl daemon-reload
    if [ "$admin" -eq 1 ]; then
        run systemctl unmask dspyrt-streams.service
    else
        # The agents' units want dspyrt-streams; it runs where the admin password is (--admin), not here.
        run systemctl mask dspyrt-streams.service
    fi
    if [ "${#agents[@]}" -gt 0 ]; then
        note "next: systemctl enable --now$(printf ' dspyrt-agent@%s' "${agents[@]}")"
    fi
}

case "$role" in
    nats) setup_nats ;;
    agents) setup_agents ;;
esac
