# Sourced by the contrib/ci/setup-*.sh scripts, not run: what each does before its own
# steps. Set SETUP_NAME (the script's name, prefixed to every message) before sourcing.
#   log MESSAGE...            print "SETUP_NAME: MESSAGE"
#   require_root              exit 1 with a message unless running as root
#   install_missing PKG...    apt-get install the packages dpkg does not list as installed
#                             (apt-get update first; nothing when all are there), and leave
#                             their names in the array `missing`

log() { printf '%s: %s\n' "$SETUP_NAME" "$*"; }

require_root() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "$SETUP_NAME: must run as root" >&2
        exit 1
    fi
}

install_missing() {
    local pkg
    missing=()
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # policy-rc.d may refuse to start a package's service in containers and CI; that
        # is fine: no setup script relies on a service apt starts.
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        log "packages already installed"
    fi
}
