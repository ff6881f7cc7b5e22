#!/bin/bash
# start-galera.sh -- a two-node MariaDB Galera cluster plus a garbd arbitrator on loopback,
# from Debian's packages (mariadb-server, galera-4, galera-arbitrator-4), no systemd; for
# tests/realmta/test_galera.py and as a worked example (docs/deployment.md).
# * own data dirs, sockets, logs under $GAL_DIR (default /tmp/mpp-galera); --defaults-file
#   of our own, so /etc/mysql and any other instance (start-mariadb.sh's on 3306) are untouched
# * ports from $GAL_PORT (default 23306): SQL node1 $GAL_PORT, node2 $GAL_PORT+1; Galera
#   group communication, IST and SST per node at +95..+97 (node1) and +105..+107 (node2);
#   garbd at +115.  All on 127.0.0.1.
# * database/user/password $GAL_DB/$GAL_USER/$GAL_PASSWORD (default mpp/mpp/mpp), made on
#   the cluster once it is up (Galera replicates them to both nodes)
# * root: unix-socket auth only:  mariadb --socket=$GAL_DIR/node1/mysqld.sock -u root
# Idempotent: what runs is left running; what does not is started (the first node
# bootstraps the cluster only when no node runs). Every wait is bounded.
# Usage:
#   start-galera.sh              start what is not running (whole cluster)
#   start-galera.sh stop         stop garbd and both nodes
#   start-galera.sh stop-node N  stop node N (1 or 2) cleanly
#   start-galera.sh start-node N start node N, joining the running cluster (IST or SST),
#                                and wait until it is Synced
#   start-galera.sh status       one line per node: state, cluster size
set -euo pipefail
GAL_DIR=${GAL_DIR:-/tmp/mpp-galera}
GAL_PORT=${GAL_PORT:-23306}
GAL_DB=${GAL_DB:-mpp}
GAL_USER=${GAL_USER:-mpp}
GAL_PASSWORD=${GAL_PASSWORD:-mpp}
# Seconds to wait for a node to be Synced (an SST of a fresh node takes a few seconds).
GAL_WAIT=${GAL_WAIT:-90}
CLUSTER=mpp_galera_test
PROVIDER=/usr/lib/galera/libgalera_smm.so

sql_port() { echo $((GAL_PORT + $1 - 1)); }
gcomm_port() { echo $((GAL_PORT + 95 + ($1 - 1) * 10)); }
ist_port() { echo $(($(gcomm_port "$1") + 1)); }
sst_port() { echo $(($(gcomm_port "$1") + 2)); }
GARBD_PORT=$((GAL_PORT + 115))
GCOMM="gcomm://127.0.0.1:$(gcomm_port 1),127.0.0.1:$(gcomm_port 2)"

dir() { echo "$GAL_DIR/node$1"; }
sock() { echo "$(dir "$1")/mysqld.sock"; }
pidf() { echo "$(dir "$1")/mysqld.pid"; }
as_root() { local n=$1; shift; mariadb --no-defaults --socket="$(sock "$n")" -u root --connect-timeout=2 -N -B "$@"; }
alive() { mariadb-admin --no-defaults --socket="$(sock "$1")" -u root --connect-timeout=1 ping >/dev/null 2>&1; }
status_of() { # node, variable -> value ("" when down)
    as_root "$1" -e "SHOW GLOBAL STATUS LIKE '$2'" 2>/dev/null | cut -f2 || true
}
synced() { [ "$(status_of "$1" wsrep_local_state_comment)" = Synced ] && [ "$(status_of "$1" wsrep_ready)" = ON ]; }

need() {
    local missing=()
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    [ -e "$PROVIDER" ] || missing+=(galera-4)
    command -v garbd >/dev/null || missing+=(galera-arbitrator-4)
    command -v rsync >/dev/null || missing+=(rsync)
    if [ ${#missing[@]} -gt 0 ]; then
        "$(dirname "$(readlink -f "$0")")/apt-install.sh" "${missing[@]}"
    fi
}

write_cnf() {
    local n=$1 d
    d=$(dir "$n")
    cat > "$d/my.cnf" <<CNF
[mariadbd]
user = mysql
datadir = $d/data
socket = $(sock "$n")
pid-file = $(pidf "$n")
log-error = $d/error.log
port = $(sql_port "$n")
bind-address = 127.0.0.1
skip-name-resolve
character-set-server = utf8mb4
collation-server = utf8mb4_general_ci
# small and fast for tests (durability comes from the other node, as in production)
innodb-buffer-pool-size = 32M
innodb-log-file-size = 16M
innodb-flush-log-at-trx-commit = 2
performance-schema = OFF
# what Galera needs: row-based replication, InnoDB, interleaved auto-increment locks
binlog-format = ROW
default-storage-engine = InnoDB
innodb-autoinc-lock-mode = 2
wsrep-on = ON
wsrep-provider = $PROVIDER
wsrep-cluster-name = $CLUSTER
wsrep-cluster-address = $GCOMM
wsrep-node-name = node$n
wsrep-node-address = 127.0.0.1:$(gcomm_port "$n")
wsrep-provider-options = "gmcast.listen_addr=tcp://127.0.0.1:$(gcomm_port "$n");ist.recv_addr=127.0.0.1:$(ist_port "$n");gcache.size=64M"
wsrep-sst-method = rsync
wsrep-sst-receive-address = 127.0.0.1:$(sst_port "$n")
CNF
}

start_node() { # node, "bootstrap" or ""
    local n=$1 mode=${2:-} d i args=()
    d=$(dir "$n")
    if alive "$n"; then return 0; fi
    mkdir -p "$d"
    chown mysql:mysql "$GAL_DIR" "$d"
    write_cnf "$n"
    if [ ! -d "$d/data/mysql" ]; then
        mariadb-install-db --defaults-file="$d/my.cnf" --user=mysql --datadir="$d/data" \
            --auth-root-authentication-method=socket --skip-test-db \
            > "$d/install-db.log" 2>&1 || { cat "$d/install-db.log" >&2; exit 1; }
    fi
    if [ "$mode" = bootstrap ]; then
        args+=(--wsrep-new-cluster)
        # A test cluster whose nodes were all stopped: either may start it again (in
        # production, bootstrap the node with the highest seqno: galera_recovery).
        [ -f "$d/data/grastate.dat" ] && sed -i 's/^safe_to_bootstrap: 0/safe_to_bootstrap: 1/' "$d/data/grastate.dat"
    fi
    # --wsrep-new-cluster must come after --defaults-file, the first option.
    setsid mariadbd --defaults-file="$d/my.cnf" "${args[@]}" < /dev/null > /dev/null 2>&1 &
    for i in $(seq 1 $((GAL_WAIT * 10))); do
        if alive "$n" && synced "$n"; then return 0; fi
        if [ -s "$(pidf "$n")" ] && ! kill -0 "$(cat "$(pidf "$n")")" 2>/dev/null; then break; fi
        sleep 0.1
    done
    echo "galera node$n did not become Synced within ${GAL_WAIT}s" >&2
    tail -30 "$d/error.log" >&2 || true
    exit 1
}

stop_node() {
    local n=$1 p i
    if alive "$n"; then
        mariadb-admin --no-defaults --socket="$(sock "$n")" -u root shutdown || true
    fi
    if [ -s "$(pidf "$n")" ]; then
        p=$(cat "$(pidf "$n")")
        for i in $(seq 1 300); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
        echo "galera node$n ($p) did not stop within 30 s" >&2
        return 1
    fi
}

garbd_alive() { [ -s "$GAL_DIR/garbd.pid" ] && kill -0 "$(cat "$GAL_DIR/garbd.pid")" 2>/dev/null; }

start_garbd() {
    local i
    if garbd_alive; then return 0; fi
    setsid garbd --address "$GCOMM" --group "$CLUSTER" --name garbd \
        --options "gmcast.listen_addr=tcp://127.0.0.1:$GARBD_PORT" \
        --log "$GAL_DIR/garbd.log" < /dev/null > /dev/null 2>&1 &
    echo $! > "$GAL_DIR/garbd.pid"
    # It counts once the nodes see three members.
    for i in $(seq 1 $((GAL_WAIT * 10))); do
        [ "$(status_of 1 wsrep_cluster_size)" = 3 ] || [ "$(status_of 2 wsrep_cluster_size)" = 3 ] && return 0
        garbd_alive || break
        sleep 0.1
    done
    echo "garbd did not join within ${GAL_WAIT}s" >&2
    tail -20 "$GAL_DIR/garbd.log" >&2 || true
    exit 1
}

stop_garbd() {
    local p i
    garbd_alive || return 0
    p=$(cat "$GAL_DIR/garbd.pid")
    kill -TERM "$p" 2>/dev/null || true
    for i in $(seq 1 100); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
}

status() {
    local n
    for n in 1 2; do
        if alive "$n"; then
            echo "node$n 127.0.0.1:$(sql_port "$n") $(status_of "$n" wsrep_local_state_comment) cluster_size=$(status_of "$n" wsrep_cluster_size)"
        else
            echo "node$n 127.0.0.1:$(sql_port "$n") down"
        fi
    done
    if garbd_alive; then echo "garbd 127.0.0.1:$GARBD_PORT running"; else echo "garbd down"; fi
}

case "${1:-start}" in
stop)
    stop_garbd
    stop_node 2 || true
    stop_node 1
    exit 0 ;;
stop-node)
    stop_node "${2:?node 1 or 2}"; exit 0 ;;
start-node)
    start_node "${2:?node 1 or 2}"; exit 0 ;;
status)
    status; exit 0 ;;
start) ;;
*)
    echo "usage: $0 [start|stop|stop-node N|start-node N|status]" >&2; exit 2 ;;
esac

need
mkdir -p "$GAL_DIR"
if alive 1 || alive 2; then
    start_node 1
    start_node 2
else
    start_node 1 bootstrap
    start_node 2
fi
start_garbd
first=1; alive 1 || first=2
as_root "$first" <<SQL
CREATE DATABASE IF NOT EXISTS \`$GAL_DB\` CHARACTER SET utf8mb4;
CREATE USER IF NOT EXISTS '$GAL_USER'@'%' IDENTIFIED BY '$GAL_PASSWORD';
GRANT ALL PRIVILEGES ON \`$GAL_DB\`.* TO '$GAL_USER'@'%';
SQL
status
echo "  URLs: mysql+pymysql://$GAL_USER:$GAL_PASSWORD@127.0.0.1:$(sql_port 1)/$GAL_DB and ...@127.0.0.1:$(sql_port 2)/$GAL_DB"
echo "  stop: $0 stop"
