#!/usr/bin/env bash
# Bring up / tear down the real services the integration tests run against.
#
#   scripts/services.sh start  [SERVICE...]   start (installing Debian packages if missing)
#   scripts/services.sh stop   [SERVICE...]   stop what this script started, by PID
#   scripts/services.sh status                one line per service
#
# SERVICE is any of: postgres sshd slurm sge (none = all four). Run as root on Debian 12.
# Both start and stop are idempotent. start (re)writes ${HPC_SERVICES_DIR}/env.sh, a file of
# `export` lines for the services that are up, which the test suite reads:
#
#   postgres  HPC_TEST_PG_HOST HPC_TEST_PG_PORT HPC_TEST_PG_USER
#             A server already answering on 127.0.0.1:5432 is used as it is and never stopped.
#             Otherwise a private cluster (trust auth) runs on 5432, or 5433 if 5432 is taken.
#             HPC_SERVICES_PG_PRIVATE=1 forces the private cluster (to test that path).
#   sshd      HPC_TEST_SSH_HOST HPC_TEST_SSH_PORT HPC_TEST_SSH_USER HPC_TEST_SSH_PASSWORD
#             HPC_TEST_SSH_KEYS (dir: id_ed25519 no passphrase, id_ecdsa passphrase "ecdsa-pass",
#             id_rsa passphrase "rsa-pass", id_rsa_pem PEM without passphrase)
#             HPC_TEST_SSH_HOST_KEYS (ssh-keyscan output, known_hosts format)
#             A second OpenSSH server on 127.0.0.1:2222, separate from the system one.
#   slurm     HPC_TEST_SLURM=1 HPC_TEST_SLURM_ACCOUNTING=slurmdbd|jobcomp HPC_TEST_SLURM_PARTITION
#             munge + slurmctld + slurmd (+ slurmdbd on the MariaDB at 127.0.0.1:3306 when it
#             answers; jobcomp/filetxt is configured in both cases, for `sacct -c`).
#             HPC_SERVICES_SLURM_ACCOUNTING=jobcomp|slurmdbd forces one mode (default: auto); it
#             takes effect when slurmctld is (re)started.
#   sge       HPC_TEST_SGE=1 SGE_ROOT SGE_CELL HPC_TEST_SGE_QUEUE
#             Son of Grid Engine qmaster + execd, queue all.q with 8 slots on this host.
#
# sshd, slurm and sge share the test user hpcuser (password hpc-test-password), created if missing.
#
# State (configs, logs, pidfiles, keys, spool) lives under
# ${HPC_SERVICES_DIR:-/var/tmp/hpc-job-controller/services},
# which must be world-traversable (slurm, munge and postgres run as their own users) and free of
# spaces. What cannot live there: /etc/slurm/slurm.conf and slurmdbd.conf (every Slurm client reads
# them from there), /run/munge and /run/sshd (fixed by the daemons), SGE's cell and spool under
# /var/lib/gridengine and /var/spool/gridengine (fixed by Debian's package), and the slurm_acct_db
# database in MariaDB.
#
# stop cancels every Slurm and SGE job first (whoever submitted it), then TERMs each daemon it
# started and waits for it (sge_qmaster takes about 9 s); env.sh is rewritten after stop too.
#
# Known limits: sge_qmaster/sge_execd listen on 0.0.0.0:6444/6445 and slurmdbd on 0.0.0.0:6819
# (neither has a loopback-only setting: slurmdbd ignores DbdAddr and CommunicationParameters for
# its listening socket); everything else listens on 127.0.0.1 only. start and stop hold
# ${HPC_SERVICES_DIR}/.lock, so concurrent runs wait for each other.

set -Eeuo pipefail
umask 022

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# One state directory per machine, not per checkout: the services are the
# machine's (fixed ports, /etc/slurm), so every clone must see the same ones.
STATE=$(realpath -m "${HPC_SERVICES_DIR:-/var/tmp/hpc-job-controller/services}")
ENV_FILE=$STATE/env.sh
APT_LOG=$STATE/apt.log
ALL_SERVICES=(postgres sshd slurm sge)
HOST_SHORT=$(hostname -s)

TEST_USER=hpcuser
TEST_PASSWORD=hpc-test-password
TEST_HOME=
SSH_PORT=2222
KEYS_DIR=$STATE/keys
SSH_HOST_KEYS=$STATE/ssh_host_keys
SLURM_DB_PASSWORD=slurmdbd-test-password   # MariaDB on loopback only; fixed so checkouts agree
export SGE_ROOT=/var/lib/gridengine SGE_CELL=default

APT_UPDATED=0
USER_READY=0
# shellcheck disable=SC2034  # read by the EXIT trap
WRITE_ENV_ON_EXIT=0

# ---------------------------------------------------------------- helpers

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

note() { echo "  .. $*" >&2; }

die() {  # die MESSAGE [LOGFILE...]: explain, show the end of each log, exit 1
    local msg=$1 f
    shift
    echo "services.sh: ERROR: $msg" >&2
    for f in "$@"; do
        if [[ -s $f ]]; then
            echo "---- last lines of $f ----" >&2
            tail -n 25 "$f" >&2
        fi
    done
    exit 1
}

trap 'echo "services.sh: ERROR: line $LINENO: \"$BASH_COMMAND\" failed" >&2' ERR
trap 'rc=$?; if (( rc != 0 && WRITE_ENV_ON_EXIT )); then write_env || true; fi' EXIT

now_ns() { date +%s%N; }
since() { awk -v a="$1" -v b="$(now_ns)" 'BEGIN { printf "%.1fs", (b - a) / 1e9 }'; }
report() { printf '%-9s %s (%s)\n' "$1:" "$2" "$(since "$3")"; }

wait_for() {  # wait_for SECONDS CMD...: poll CMD every 0.2 s until it succeeds
    local deadline=$(( $(now_ns) + $1 * 1000000000 ))
    shift
    until "$@" >/dev/null 2>&1; do
        (( $(now_ns) < deadline )) || return 1
        sleep 0.2
    done
}

daemon() {  # start a daemon without our lock fd (it would hold the lock for its whole life)
    "$@" 9>&- </dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

proc_alive() {  # a pid that exists and is not a zombie (PID 1 here reaps late)
    local state
    [[ -r /proc/$1/stat ]] || return 1
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

pid_of() {  # pid_of PIDFILE COMM: print the pid if that process runs and is named COMM
    local pid comm
    [[ -s $1 ]] || return 1
    pid=$(head -n1 "$1" | tr -dc '0-9')
    [[ -n $pid ]] && proc_alive "$pid" || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "${2:0:15}" ]] || return 1
    echo "$pid"
}

stop_pidfile() {  # stop_pidfile PIDFILE COMM [GRACE_SECONDS]: TERM, wait, then KILL
    local pid grace=${3:-20} i
    if ! pid=$(pid_of "$1" "$2"); then
        rm -f "$1"
        return 1
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for (( i = 0; i < grace * 5; i++ )); do
        proc_alive "$pid" || break
        sleep 0.2
    done
    if proc_alive "$pid"; then
        note "$2 (pid $pid) ignored SIGTERM for ${grace}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.3
    fi
    rm -f "$1"
}

ensure_pkgs() {  # install whichever of the Debian packages are missing
    local missing=() p
    for p in "$@"; do
        [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) == installed ]] || missing+=("$p")
    done
    (( ${#missing[@]} )) || return 0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then  # so that apt never starts daemons itself
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
    fi
    note "installing ${missing[*]} (log: $APT_LOG)"
    if (( ! APT_UPDATED )); then
        apt-get -o DPkg::Lock::Timeout=600 update >>"$APT_LOG" 2>&1 || die "apt-get update failed" "$APT_LOG"
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        -o DPkg::Lock::Timeout=600 "${missing[@]}" >>"$APT_LOG" 2>&1 \
        || die "apt-get install ${missing[*]} failed" "$APT_LOG"
}

ensure_test_user() {  # the unprivileged user shared by sshd, slurm and sge
    (( USER_READY )) && return 0
    local uid
    if ! id -u "$TEST_USER" >/dev/null 2>&1; then
        useradd -m -s /bin/bash "$TEST_USER"
    fi
    uid=$(id -u "$TEST_USER")
    (( uid >= 1000 )) || die "user $TEST_USER has uid $uid; SGE (min_uid 1000) will not run its jobs"
    echo "$TEST_USER:$TEST_PASSWORD" | chpasswd
    TEST_HOME=$(getent passwd "$TEST_USER" | cut -d: -f6)
    [[ -d $TEST_HOME ]] || install -d -o "$TEST_USER" -g "$TEST_USER" -m 755 "$TEST_HOME"
    chmod go-w "$TEST_HOME"  # sshd's StrictModes
    USER_READY=1
}

require_traversable() {  # daemons running as USER must reach files under $STATE
    runuser -u "$1" -- test -x "$STATE" \
        || die "$STATE is not reachable by user $1; set HPC_SERVICES_DIR to a world-traversable path"
}

# ---------------------------------------------------------------- postgres

PG_DIR=$STATE/postgres
PG_DATA=$PG_DIR/data
PG_LOG=$PG_DIR/postgres.log      # the server's log
PG_CTL_LOG=$PG_DIR/pg_ctl.log     # initdb and pg_ctl output
PG_BIN=/usr/lib/postgresql/15/bin

pg_answers() {  # pg_answers PORT
    if command -v pg_isready >/dev/null; then
        pg_isready -q -h 127.0.0.1 -p "$1" -t 3
    else
        port_open "$1"
    fi
}

pg_private_pid() { pid_of "$PG_DATA/postmaster.pid" postgres; }
pg_private_port() { sed -n 4p "$PG_DATA/postmaster.pid"; }

pg_port() {  # the port of the server we use, if it is up
    if pg_private_pid >/dev/null; then
        pg_private_port
    elif [[ -e $PG_DIR/external ]] && pg_answers 5432; then
        echo 5432
    else
        return 1
    fi
}

start_postgres() {
    local t0 port pid
    t0=$(now_ns)
    install -d -m 755 "$PG_DIR"
    if pid=$(pg_private_pid); then
        report postgres "private cluster already running (pid $pid, 127.0.0.1:$(pg_private_port))" "$t0"
        return
    fi
    if [[ ${HPC_SERVICES_PG_PRIVATE:-0} != 1 ]] && pg_answers 5432; then
        touch "$PG_DIR/external"
        report postgres "using the server already answering on 127.0.0.1:5432 (not ours, never stopped)" "$t0"
        return
    fi
    rm -f "$PG_DIR/external"
    ensure_pkgs postgresql-15 postgresql-client-15
    require_traversable postgres
    chown postgres:postgres "$PG_DIR"
    install -d -o postgres -g postgres -m 700 "$PG_DATA"
    install -d -o postgres -g postgres -m 755 "$PG_DIR/run"
    touch "$PG_LOG"
    chown postgres:postgres "$PG_LOG"  # written by the server, as postgres
    if [[ ! -s $PG_DATA/PG_VERSION ]]; then
        runuser -u postgres -- "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -A trust -E UTF8 \
            --no-sync >>"$PG_CTL_LOG" 2>&1 || die "postgres: initdb failed" "$PG_CTL_LOG"
        cat >>"$PG_DATA/postgresql.conf" <<EOF
# added by scripts/services.sh
listen_addresses = '127.0.0.1'
unix_socket_directories = '$PG_DIR/run'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
EOF
    fi
    port=5432
    if port_open 5432; then port=5433; fi
    port_open "$port" && die "postgres: ports 5432 and 5433 on 127.0.0.1 are both taken"
    daemon runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 -o "-p $port" start \
        >>"$PG_CTL_LOG" 2>&1 || die "postgres: private cluster did not start" "$PG_CTL_LOG" "$PG_LOG"
    if ! psql -h 127.0.0.1 -p "$port" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" \
            | grep -q 1; then
        createdb -h 127.0.0.1 -p "$port" -U postgres test
    fi
    report postgres "started a private cluster on 127.0.0.1:$port (pid $(pg_private_pid))" "$t0"
}

stop_postgres() {
    local t0
    t0=$(now_ns)
    if [[ -e $PG_DIR/external ]]; then
        rm -f "$PG_DIR/external"
        report postgres "the machine's server on 127.0.0.1:5432 is not ours: left running" "$t0"
    elif pg_private_pid >/dev/null; then
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >>"$PG_CTL_LOG" 2>&1 \
            || die "postgres: pg_ctl stop failed" "$PG_CTL_LOG" "$PG_LOG"
        report postgres "stopped the private cluster" "$t0"
    else
        report postgres "not running" "$t0"
    fi
}

status_postgres() {
    local pid
    if pid=$(pg_private_pid); then
        echo "postgres: up, private cluster pid $pid on 127.0.0.1:$(pg_private_port)"
    elif [[ -e $PG_DIR/external ]] && pg_answers 5432; then
        echo "postgres: up, using the machine's server on 127.0.0.1:5432"
    elif pg_answers 5432; then
        echo "postgres: down (not started here; a server not ours answers on 127.0.0.1:5432)"
    else
        echo "postgres: down"
    fi
}

# ---------------------------------------------------------------- sshd

SSHD_DIR=$STATE/sshd
SSHD_CONFIG=$SSHD_DIR/sshd_config
SSHD_PIDFILE=$SSHD_DIR/sshd.pid
SSHD_LOG=$SSHD_DIR/sshd.log

sshd_pid() { pid_of "$SSHD_PIDFILE" sshd; }

ssh_test() {  # ssh_test [ssh options]: run `true` as the test user
    ssh -p "$SSH_PORT" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        -o LogLevel=ERROR -o ConnectTimeout=10 "$@" "$TEST_USER@127.0.0.1" true </dev/null
}

make_ssh_keys() {
    local t
    install -d -m 700 "$SSHD_DIR" "$KEYS_DIR"
    for t in ed25519 ecdsa rsa; do
        [[ -s $SSHD_DIR/host_$t ]] || ssh-keygen -q -t "$t" -N '' -C "hpc-test-host-$t" -f "$SSHD_DIR/host_$t"
    done
    [[ -s $KEYS_DIR/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -C hpc-test-ed25519 -f "$KEYS_DIR/id_ed25519"
    [[ -s $KEYS_DIR/id_ecdsa ]] || ssh-keygen -q -t ecdsa -N ecdsa-pass -C hpc-test-ecdsa -f "$KEYS_DIR/id_ecdsa"
    [[ -s $KEYS_DIR/id_rsa ]] || ssh-keygen -q -t rsa -b 2048 -N rsa-pass -C hpc-test-rsa -f "$KEYS_DIR/id_rsa"
    [[ -s $KEYS_DIR/id_rsa_pem ]] || ssh-keygen -q -t rsa -b 2048 -m PEM -N '' -C hpc-test-rsa-pem \
        -f "$KEYS_DIR/id_rsa_pem"
    chmod 600 "$KEYS_DIR"/id_ed25519 "$KEYS_DIR"/id_ecdsa "$KEYS_DIR"/id_rsa "$KEYS_DIR"/id_rsa_pem
    install -d -o "$TEST_USER" -g "$TEST_USER" -m 700 "$TEST_HOME/.ssh"
    cat "$KEYS_DIR"/id_ed25519.pub "$KEYS_DIR"/id_ecdsa.pub "$KEYS_DIR"/id_rsa.pub "$KEYS_DIR"/id_rsa_pem.pub \
        >"$TEST_HOME/.ssh/authorized_keys"
    chown "$TEST_USER:$TEST_USER" "$TEST_HOME/.ssh/authorized_keys"
    chmod 600 "$TEST_HOME/.ssh/authorized_keys"
}

start_sshd() {
    local t0 pid askpass
    t0=$(now_ns)
    ensure_pkgs openssh-server openssh-client python3-venv
    ensure_test_user
    make_ssh_keys
    if pid=$(sshd_pid); then
        [[ -s $SSH_HOST_KEYS ]] || ssh-keyscan -p "$SSH_PORT" -t ed25519,ecdsa,rsa 127.0.0.1 >"$SSH_HOST_KEYS" 2>/dev/null
        report sshd "already running (pid $pid, 127.0.0.1:$SSH_PORT)" "$t0"
        return
    fi
    port_open "$SSH_PORT" && die "sshd: 127.0.0.1:$SSH_PORT is taken by a process this script did not start"
    cat >"$SSHD_CONFIG" <<EOF
# written by scripts/services.sh: a test sshd, separate from the system one
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $SSHD_DIR/host_ed25519
HostKey $SSHD_DIR/host_ecdsa
HostKey $SSHD_DIR/host_rsa
PidFile $SSHD_PIDFILE
AuthorizedKeysFile .ssh/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication yes
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin no
AllowUsers $TEST_USER
X11Forwarding no
PrintMotd no
PrintLastLog no
LogLevel VERBOSE
# tests open many connections and channels at once
MaxStartups 100:30:200
MaxSessions 100
Subsystem sftp internal-sftp
EOF
    install -d -m 755 /run/sshd  # sshd refuses to start without its privilege-separation dir
    /usr/sbin/sshd -t -f "$SSHD_CONFIG" >>"$SSHD_LOG" 2>&1 || die "sshd: config test failed" "$SSHD_LOG"
    daemon /usr/sbin/sshd -f "$SSHD_CONFIG" -E "$SSHD_LOG" || die "sshd: did not start" "$SSHD_LOG"
    if ! { wait_for 10 port_open "$SSH_PORT" && wait_for 5 sshd_pid; }; then
        die "sshd: not listening on 127.0.0.1:$SSH_PORT after 10s" "$SSHD_LOG"
    fi
    ssh-keyscan -p "$SSH_PORT" -t ed25519,ecdsa,rsa 127.0.0.1 >"$SSH_HOST_KEYS.tmp" 2>/dev/null || true
    [[ $(grep -c . "$SSH_HOST_KEYS.tmp") -ge 3 ]] || die "sshd: ssh-keyscan did not return 3 host keys" "$SSHD_LOG"
    mv "$SSH_HOST_KEYS.tmp" "$SSH_HOST_KEYS"
    chmod 644 "$SSH_HOST_KEYS"
    ssh_test -i "$KEYS_DIR/id_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes \
        || die "sshd: key login as $TEST_USER failed" "$SSHD_LOG"
    askpass=$SSHD_DIR/askpass
    printf '#!/bin/sh\necho %s\n' "$TEST_PASSWORD" >"$askpass"
    chmod 700 "$askpass"
    SSH_ASKPASS=$askpass SSH_ASKPASS_REQUIRE=force ssh_test -o PreferredAuthentications=password \
        -o PubkeyAuthentication=no -o NumberOfPasswordPrompts=1 \
        || die "sshd: password login as $TEST_USER failed" "$SSHD_LOG"
    report sshd "started on 127.0.0.1:$SSH_PORT (pid $(sshd_pid)), key and password login checked" "$t0"
}

stop_sshd() {
    local t0
    t0=$(now_ns)
    if stop_pidfile "$SSHD_PIDFILE" sshd 10; then
        report sshd "stopped" "$t0"
    else
        report sshd "not running" "$t0"
    fi
}

status_sshd() {
    local pid
    if pid=$(sshd_pid); then
        echo "sshd:     up, pid $pid on 127.0.0.1:$SSH_PORT"
    else
        echo "sshd:     down"
    fi
}

# ---------------------------------------------------------------- slurm

SLURM_DIR=$STATE/slurm
SLURM_LOGDIR=$SLURM_DIR/log
SLURM_RUNDIR=$SLURM_DIR/run
MUNGE_DIR=$SLURM_DIR/munge
SLURM_CONF=/etc/slurm/slurm.conf
SLURMDBD_CONF=/etc/slurm/slurmdbd.conf
JOBCOMP_FILE=$SLURM_LOGDIR/jobcomp.txt

munged_pid() { pid_of "$MUNGE_DIR/munged.pid" munged; }
slurmdbd_pid() { pid_of "$SLURM_RUNDIR/slurmdbd.pid" slurmdbd; }
slurmctld_pid() { pid_of "$SLURM_RUNDIR/slurmctld.pid" slurmctld; }
slurmd_pid() { pid_of "$SLURM_RUNDIR/slurmd.pid" slurmd; }
slurm_accounting() { cat "$SLURM_DIR/accounting" 2>/dev/null || echo jobcomp; }

slurm_up() {
    munge_works && slurmctld_pid >/dev/null && slurmd_pid >/dev/null || return 1
    [[ $(slurm_accounting) != slurmdbd ]] || slurmdbd_pid >/dev/null
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

mysql_root() {
    local client
    client=$(command -v mariadb || command -v mysql) || return 1
    "$client" --protocol=TCP -h 127.0.0.1 -P 3306 -u root --connect-timeout=5 "$@"
}

mariadb_reachable() {  # MariaDB on 127.0.0.1:3306 that root can use without a password
    port_open 3306 || return 1
    command -v mariadb >/dev/null || command -v mysql >/dev/null || ensure_pkgs mariadb-client
    mysql_root -e 'SELECT 1' >/dev/null 2>&1
}

slurmctld_answers() { scontrol ping 2>/dev/null | grep -q UP; }
slurm_queue_empty() { [[ -z $(squeue -h -o %i 2>/dev/null) ]]; }
slurm_node_state() { sinfo -h -n "$HOST_SHORT" -o %T 2>/dev/null | head -n1; }
slurm_node_idle() { [[ $(slurm_node_state) == idle ]]; }

write_slurm_conf() {  # write_slurm_conf slurmdbd|jobcomp
    local storage=accounting_storage/none
    [[ $1 == slurmdbd ]] && storage=accounting_storage/slurmdbd
    cat >"$SLURM_CONF" <<EOF
# written by scripts/services.sh: single-node test cluster, state in $SLURM_DIR
ClusterName=ci
SlurmctldHost=$HOST_SHORT(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=$SLURM_DIR/spool/ctld
SlurmdSpoolDir=$SLURM_DIR/spool/d
SlurmctldPidFile=$SLURM_RUNDIR/slurmctld.pid
SlurmdPidFile=$SLURM_RUNDIR/slurmd.pid
SlurmctldLogFile=$SLURM_LOGDIR/slurmctld.log
SlurmdLogFile=$SLURM_LOGDIR/slurmd.log
# no cgroups in this VM
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=$storage
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
# also kept with slurmdbd: the scheduler code falls back to \`sacct -c\` without accounting
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP_FILE
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# a trivial job completes in ~1 s instead of ~9 s
SchedulerParameters=sched_interval=1
KillWait=5
# a benchmark holds 5,000 jobs
MaxJobCount=20000
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
# 8 job slots whatever the cores: the tests run several sleeping jobs at once
# (config_overrides lets slurmd accept more CPUs than it counts)
SlurmdParameters=config_overrides
NodeName=$HOST_SHORT NodeAddr=127.0.0.1 CPUs=8 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 644 "$SLURM_CONF"
    if [[ $1 == slurmdbd ]]; then
        cat >"$SLURMDBD_CONF" <<EOF
# written by scripts/services.sh
AuthType=auth/munge
DbdHost=$HOST_SHORT
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
LogFile=$SLURM_LOGDIR/slurmdbd.log
PidFile=$SLURM_RUNDIR/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=$SLURM_DB_PASSWORD
StorageLoc=slurm_acct_db
EOF
        chown slurm:slurm "$SLURMDBD_CONF"
        chmod 600 "$SLURMDBD_CONF"
    fi
}

setup_slurm_db() {
    local u
    {
        echo "CREATE DATABASE IF NOT EXISTS slurm_acct_db;"
        for u in "'slurm'@'localhost'" "'slurm'@'127.0.0.1'"; do
            echo "CREATE USER IF NOT EXISTS $u IDENTIFIED BY '$SLURM_DB_PASSWORD';"
            echo "ALTER USER $u IDENTIFIED BY '$SLURM_DB_PASSWORD';"
            echo "GRANT ALL PRIVILEGES ON slurm_acct_db.* TO $u;"
        done
    } | mysql_root
}

slurm_register_accounts() {  # cluster, account and associations in slurmdbd (idempotent)
    local out=$SLURM_LOGDIR/sacctmgr.log
    if ! sacctmgr -n -P list cluster format=cluster 2>>"$out" | grep -qx ci; then
        sacctmgr -i add cluster ci >>"$out" 2>&1 || die "slurm: sacctmgr add cluster ci failed" "$out"
    fi
    if ! sacctmgr -n -P list account format=account 2>>"$out" | grep -qx hpc; then
        sacctmgr -i add account hpc Cluster=ci Description=hpc-tests Organization=ci >>"$out" 2>&1 \
            || die "slurm: sacctmgr add account hpc failed" "$out"
    fi
    if ! sacctmgr -n -P list assoc where cluster=ci user="$TEST_USER" format=user 2>>"$out" | grep -qx "$TEST_USER"; then
        sacctmgr -i add user "$TEST_USER" Account=hpc Cluster=ci >>"$out" 2>&1 \
            || die "slurm: sacctmgr add user $TEST_USER failed" "$out"
    fi
    if ! sacctmgr -n -P list assoc where cluster=ci user=root format=user 2>>"$out" | grep -qx root; then
        sacctmgr -i add user root Account=root Cluster=ci >>"$out" 2>&1 \
            || die "slurm: sacctmgr add user root failed" "$out"
    fi
}

slurm_job_done() {  # slurm_job_done ID MODE: the job reached COMPLETED in accounting
    if [[ $2 == slurmdbd ]]; then
        [[ $(sacct -n -X -P -j "$1" -o State 2>/dev/null | head -n1) == COMPLETED ]]
    else
        grep -q "JobId=$1 .*JobState=COMPLETED" "$JOBCOMP_FILE" 2>/dev/null
    fi
}

start_slurm() {
    local t0 mode pid id started=()
    t0=$(now_ns)
    ensure_pkgs munge slurmctld slurmd slurm-client
    ensure_test_user
    if slurm_up; then
        report slurm "already running (slurmctld pid $(slurmctld_pid), accounting $(slurm_accounting))" "$t0"
        return
    fi
    require_traversable slurm
    install -d -m 755 "$SLURM_DIR" "$SLURM_DIR/spool" "$SLURM_DIR/spool/d"
    install -d -o slurm -g slurm -m 755 "$SLURM_LOGDIR" "$SLURM_RUNDIR" "$SLURM_DIR/spool/ctld"
    install -d -o munge -g munge -m 700 "$MUNGE_DIR"

    # munge: the socket path is fixed (/run/munge) because every client looks there
    if ! munge_works; then
        if [[ ! -s /etc/munge/munge.key ]]; then
            runuser -u munge -- mungekey --create >>"$MUNGE_DIR/munged.log" 2>&1 \
                || die "slurm: could not create /etc/munge/munge.key" "$MUNGE_DIR/munged.log"
        fi
        install -d -o munge -g munge -m 755 /run/munge
        daemon runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_DIR/munged.pid" \
            --log-file="$MUNGE_DIR/munged.log" || die "slurm: munged did not start" "$MUNGE_DIR/munged.log"
        wait_for 10 munge_works || die "slurm: munge does not answer" "$MUNGE_DIR/munged.log"
        started+=(munged)
    fi

    # the accounting mode is decided while slurmctld is down, and kept while it runs
    if slurmctld_pid >/dev/null; then
        mode=$(slurm_accounting)
    else
        mode=jobcomp
        case ${HPC_SERVICES_SLURM_ACCOUNTING:-auto} in
            jobcomp) ;;
            auto | slurmdbd)
                if mariadb_reachable; then
                    ensure_pkgs slurmdbd
                    mode=slurmdbd
                elif [[ ${HPC_SERVICES_SLURM_ACCOUNTING:-auto} == slurmdbd ]]; then
                    die "slurm: slurmdbd asked for, but MariaDB does not answer on 127.0.0.1:3306 as root"
                else
                    note "MariaDB does not answer on 127.0.0.1:3306 as root: Slurm runs without slurmdbd"
                fi
                ;;
            *) die "HPC_SERVICES_SLURM_ACCOUNTING must be auto, slurmdbd or jobcomp" ;;
        esac
        write_slurm_conf "$mode"
        echo "$mode" >"$SLURM_DIR/accounting"
        touch "$JOBCOMP_FILE"
        chown slurm:slurm "$JOBCOMP_FILE"
        chmod 666 "$JOBCOMP_FILE"  # `sacct -c` as a normal user reads it
    fi

    if [[ $mode == slurmdbd ]]; then
        if ! slurmdbd_pid >/dev/null; then
            setup_slurm_db
            daemon /usr/sbin/slurmdbd || die "slurm: slurmdbd did not start" "$SLURM_LOGDIR/slurmdbd.log"
            wait_for 60 sacctmgr -n list cluster \
                || die "slurm: slurmdbd does not answer on 127.0.0.1:6819" "$SLURM_LOGDIR/slurmdbd.log"
            started+=(slurmdbd)
        fi
        slurm_register_accounts
    fi

    if ! slurmctld_pid >/dev/null; then
        daemon /usr/sbin/slurmctld || die "slurm: slurmctld did not start" "$SLURM_LOGDIR/slurmctld.log"
        wait_for 30 slurmctld_answers \
            || die "slurm: slurmctld does not answer" "$SLURM_LOGDIR/slurmctld.log"
        started+=(slurmctld)
    fi
    if ! slurmd_pid >/dev/null; then
        daemon /usr/sbin/slurmd || die "slurm: slurmd did not start" "$SLURM_LOGDIR/slurmd.log"
        started+=(slurmd)
    fi
    if ! wait_for 10 slurm_node_idle; then
        # a node left down or drained by an earlier run
        scontrol update nodename="$HOST_SHORT" state=resume >/dev/null 2>&1 || true
        wait_for 20 slurm_node_idle || die "slurm: node $HOST_SHORT is '$(slurm_node_state)', not idle" \
            "$SLURM_LOGDIR/slurmd.log" "$SLURM_LOGDIR/slurmctld.log"
    fi

    # a real job as the test user, seen through accounting
    id=$(cd "$TEST_HOME" && runuser -u "$TEST_USER" -- sbatch --parsable -J services-check \
            -o /dev/null -e /dev/null --wrap true 2>>"$SLURM_LOGDIR/sbatch.log") \
        || die "slurm: sbatch as $TEST_USER failed" "$SLURM_LOGDIR/sbatch.log" "$SLURM_LOGDIR/slurmctld.log"
    id=${id%%;*}
    wait_for 60 slurm_job_done "$id" "$mode" \
        || die "slurm: check job $id did not show as COMPLETED in accounting ($mode) within 60s" \
            "$SLURM_LOGDIR/slurmctld.log" "$SLURM_LOGDIR/slurmd.log" "$SLURM_LOGDIR/slurmdbd.log"
    chmod 666 "$JOBCOMP_FILE"
    report slurm "started ${started[*]:-nothing new} (accounting $mode, check job $id COMPLETED)" "$t0"
}

stop_slurm() {
    local t0 stopped=() jobs
    t0=$(now_ns)
    if slurmctld_pid >/dev/null; then
        # proctrack/linuxproc: jobs outlive slurmd, so cancel them first
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            echo "$jobs" | xargs -r scancel >/dev/null 2>&1 || true
            wait_for 20 slurm_queue_empty \
                || note "slurm: jobs still in squeue after scancel: $(squeue -h -o %i | head -c 200)"
        fi
    fi
    stop_pidfile "$SLURM_RUNDIR/slurmd.pid" slurmd && stopped+=(slurmd)
    stop_pidfile "$SLURM_RUNDIR/slurmctld.pid" slurmctld && stopped+=(slurmctld)
    stop_pidfile "$SLURM_RUNDIR/slurmdbd.pid" slurmdbd && stopped+=(slurmdbd)
    stop_pidfile "$MUNGE_DIR/munged.pid" munged && stopped+=(munged)
    if (( ${#stopped[@]} )); then
        report slurm "stopped ${stopped[*]}${jobs:+ after cancelling $(wc -w <<<"$jobs") job(s)}" "$t0"
    else
        report slurm "not running" "$t0"
    fi
}

status_slurm() {
    local d pid parts=()
    for d in munged slurmdbd slurmctld slurmd; do
        if pid=$("${d}_pid"); then parts+=("$d $pid"); else parts+=("$d -"); fi
    done
    if slurm_up; then
        echo "slurm:    up ($(IFS=,; echo "${parts[*]}"); accounting $(slurm_accounting); node $(slurm_node_state))"
    else
        echo "slurm:    down ($(IFS=,; echo "${parts[*]}"))"
    fi
}

# ---------------------------------------------------------------- sge

SGE_DIR=$STATE/sge
SGE_COMMON=$SGE_ROOT/$SGE_CELL/common
SGE_QMASTER_SPOOL=/var/spool/gridengine/qmaster
SGE_EXECD_SPOOL=/var/spool/gridengine/execd
SGE_QUEUE=all.q

qmaster_pid() { pid_of "$SGE_DIR/qmaster.pid" sge_qmaster; }
execd_pid() { pid_of "$SGE_DIR/execd.pid" sge_execd; }
sge_up() { qmaster_pid >/dev/null && execd_pid >/dev/null; }

record_execd_pid() {  # copy the pid of the running execd into our state, once it has written it
    local f
    # execd names its spool directory after what the host resolves to (here: localhost)
    for f in "$SGE_EXECD_SPOOL"/*/execd.pid; do
        if pid_of "$f" sge_execd >/dev/null; then
            cp "$f" "$SGE_DIR/execd.pid"
            return 0
        fi
    done
    return 1
}

sge_qconf_edit() {  # sge_qconf_edit SED_SCRIPT QCONF_ARGS...: qconf -m*/-a* through a sed "editor"
    SGE_SED=$1 EDITOR=$SGE_DIR/sed-editor qconf "${@:2}" >>"$SGE_DIR/qconf.log" 2>&1
}

sge_queue_ready() {  # the queue instance on this host reports load and has no state flags
    local line fields
    line=$(qstat -f -q "$SGE_QUEUE" 2>/dev/null | grep "^$SGE_QUEUE@") || return 1
    read -r -a fields <<<"$line"  # queuename qtype resv/used/tot load_avg arch [states]
    [[ ${#fields[@]} -eq 5 && ${fields[3]} != -NA- ]]
}

sge_queue_empty() { [[ -z $(qstat -u '*' 2>/dev/null) ]]; }

start_sge() {
    local t0 pid id f started=()
    t0=$(now_ns)
    if ! dpkg-query -W -f='${db:Status-Status}' gridengine-master 2>/dev/null | grep -qx installed; then
        # the packages initialise the cell from these answers at install time
        printf '%s\n' "gridengine-common shared/gridengineconfig boolean true" \
            "gridengine-common shared/gridenginecell string $SGE_CELL" \
            "gridengine-common shared/gridenginemaster string $HOST_SHORT" \
            "gridengine-client shared/gridenginemaster string $HOST_SHORT" | debconf-set-selections
    fi
    ensure_pkgs gridengine-master gridengine-exec gridengine-client
    ensure_test_user
    if sge_up; then
        report sge "already running (qmaster pid $(qmaster_pid), execd pid $(execd_pid))" "$t0"
        return
    fi
    install -d -m 755 "$SGE_DIR"
    cat >"$SGE_DIR/sed-editor" <<'EOF'
#!/bin/sh
# EDITOR for qconf: join backslash-continued lines, then apply $SGE_SED
sed -i -e ':a' -e '/\\$/{N;s/\\\n[[:space:]]*/ /;ba' -e '}' "$1"
exec sed -i -E -e "$SGE_SED" "$1"
EOF
    chmod 755 "$SGE_DIR/sed-editor"
    install -d -o sgeadmin -g sgeadmin -m 755 "$SGE_COMMON"
    echo "$HOST_SHORT" >"$SGE_COMMON/act_qmaster"
    # 127.0.0.1 resolves to localhost, and commlib refuses a name that differs from the host's
    echo "$HOST_SHORT localhost" >"$SGE_COMMON/host_aliases"
    chown sgeadmin:sgeadmin "$SGE_COMMON/act_qmaster" "$SGE_COMMON/host_aliases"
    if [[ ! -e /var/spool/gridengine/spooldb/sge ]]; then
        runuser -u sgeadmin -- /usr/share/gridengine/scripts/init_cluster "$SGE_ROOT" "$SGE_CELL" \
            /var/spool/gridengine/spooldb sgeadmin >>"$SGE_DIR/init_cluster.log" 2>&1 \
            || die "sge: init_cluster failed" "$SGE_DIR/init_cluster.log"
    fi

    if ! qmaster_pid >/dev/null; then
        port_open 6444 && die "sge: port 6444 is taken by a qmaster this script did not start"
        daemon /usr/sbin/sge_qmaster || die "sge: sge_qmaster did not start" "$SGE_QMASTER_SPOOL/messages"
        wait_for 30 qconf -sh || die "sge: qmaster does not answer" "$SGE_QMASTER_SPOOL/messages" \
            /tmp/qmaster_messages.*
        cp "$SGE_QMASTER_SPOOL/qmaster.pid" "$SGE_DIR/qmaster.pid"
        qmaster_pid >/dev/null || die "sge: qmaster pid file does not name a running sge_qmaster" \
            "$SGE_QMASTER_SPOOL/messages"
        started+=(qmaster)
    fi

    # configuration (each edit is idempotent)
    sge_qconf_edit 's/^schedule_interval .*/schedule_interval 0:0:1/;s/^flush_submit_sec .*/flush_submit_sec 1/;s/^flush_finish_sec .*/flush_finish_sec 1/' \
        -msconf || die "sge: qconf -msconf failed" "$SGE_DIR/qconf.log"
    # min_uid 1000: jobs run as normal users only; accounting written at once so qacct sees jobs fast
    sge_qconf_edit 's/^min_uid .*/min_uid 1000/;s/^reporting_params .*/reporting_params accounting=true reporting=false flush_time=00:00:15 joblog=false sharelog=00:00:00 accounting_flush_time=00:00:00/' \
        -mconf global || die "sge: qconf -mconf failed" "$SGE_DIR/qconf.log"
    qconf -ss 2>/dev/null | grep -qx "$HOST_SHORT" || qconf -as "$HOST_SHORT" >>"$SGE_DIR/qconf.log" 2>&1
    if ! qconf -sel 2>/dev/null | grep -qx "$HOST_SHORT"; then
        sge_qconf_edit "s/^hostname .*/hostname $HOST_SHORT/" -ae || die "sge: qconf -ae failed" "$SGE_DIR/qconf.log"
    fi
    # load_thresholds NONE: on a 2-core machine busy with the test suite the load
    # average passes np_load_avg=1.75 and Grid Engine stops scheduling (alarm state).
    f="s/^hostlist .*/hostlist $HOST_SHORT/;s/^slots .*/slots 8/;s/^pe_list .*/pe_list NONE/;s/^load_thresholds .*/load_thresholds NONE/"
    if qconf -sq "$SGE_QUEUE" >/dev/null 2>&1; then
        sge_qconf_edit "$f" -mq "$SGE_QUEUE" || die "sge: qconf -mq $SGE_QUEUE failed" "$SGE_DIR/qconf.log"
    else
        sge_qconf_edit "s/^qname .*/qname $SGE_QUEUE/;$f" -aq || die "sge: qconf -aq failed" "$SGE_DIR/qconf.log"
    fi

    if ! execd_pid >/dev/null; then
        port_open 6445 && die "sge: port 6445 is taken by an execd this script did not start"
        daemon /usr/sbin/sge_execd || die "sge: sge_execd did not start" "$SGE_EXECD_SPOOL"/*/messages
        wait_for 20 record_execd_pid || die "sge: no running sge_execd found" "$SGE_EXECD_SPOOL"/*/messages
        started+=(execd)
    fi
    qmod -c "$SGE_QUEUE" >/dev/null 2>&1 || true  # clear an error state left by an earlier run
    wait_for 30 sge_queue_ready || die "sge: queue $SGE_QUEUE@$HOST_SHORT is not ready: $(qstat -f -q "$SGE_QUEUE" | tail -n1)" \
        "$SGE_QMASTER_SPOOL/messages" "$SGE_EXECD_SPOOL"/*/messages

    id=$(cd "$TEST_HOME" && runuser -u "$TEST_USER" -- qsub -terse -b y -N services-check \
            -o /dev/null -e /dev/null true 2>>"$SGE_DIR/qsub.log") \
        || die "sge: qsub as $TEST_USER failed" "$SGE_DIR/qsub.log"
    wait_for 60 qacct -j "$id" \
        || die "sge: check job $id did not appear in qacct within 60s" "$SGE_QMASTER_SPOOL/messages" \
            "$SGE_EXECD_SPOOL"/*/messages
    report sge "started ${started[*]:-nothing new} (queue $SGE_QUEUE, check job $id in qacct)" "$t0"
}

stop_sge() {
    local t0 stopped=() jobs=
    t0=$(now_ns)
    if qmaster_pid >/dev/null; then
        jobs=$(qstat -u '*' 2>/dev/null | awk 'NR > 2 { print $1 }' | sort -u)
        if [[ -n $jobs ]]; then
            echo "$jobs" | xargs -r qdel -f >/dev/null 2>&1 || true
            wait_for 20 sge_queue_empty \
                || note "sge: jobs still in qstat after qdel"
        fi
    fi
    stop_pidfile "$SGE_DIR/execd.pid" sge_execd && stopped+=(execd)
    stop_pidfile "$SGE_DIR/qmaster.pid" sge_qmaster 40 && stopped+=(qmaster)
    if (( ${#stopped[@]} )); then
        report sge "stopped ${stopped[*]}${jobs:+ after deleting $(wc -w <<<"$jobs") job(s)}" "$t0"
    else
        report sge "not running" "$t0"
    fi
}

status_sge() {
    local q e
    q=$(qmaster_pid) || q=-
    e=$(execd_pid) || e=-
    if sge_up; then
        echo "sge:      up (qmaster $q, execd $e; queue $SGE_QUEUE)"
    else
        echo "sge:      down (qmaster $q, execd $e)"
    fi
}

# ---------------------------------------------------------------- env.sh

write_env() {
    local tmp=$ENV_FILE.tmp port up=()
    {
        echo "# Written by scripts/services.sh on $(date -Is). Source it: services that are up."
        if port=$(pg_port); then
            up+=(postgres)
            printf 'export %s=%q\n' HPC_TEST_PG_HOST 127.0.0.1 HPC_TEST_PG_PORT "$port" HPC_TEST_PG_USER postgres
        fi
        if sshd_pid >/dev/null; then
            up+=(sshd)
            printf 'export %s=%q\n' HPC_TEST_SSH_HOST 127.0.0.1 HPC_TEST_SSH_PORT "$SSH_PORT" \
                HPC_TEST_SSH_USER "$TEST_USER" HPC_TEST_SSH_PASSWORD "$TEST_PASSWORD" \
                HPC_TEST_SSH_KEYS "$KEYS_DIR" HPC_TEST_SSH_HOST_KEYS "$SSH_HOST_KEYS"
        fi
        if slurm_up; then
            up+=(slurm)
            printf 'export %s=%q\n' HPC_TEST_SLURM 1 HPC_TEST_SLURM_ACCOUNTING "$(slurm_accounting)" \
                HPC_TEST_SLURM_PARTITION debug
        fi
        if sge_up; then
            up+=(sge)
            printf 'export %s=%q\n' HPC_TEST_SGE 1 SGE_ROOT "$SGE_ROOT" SGE_CELL "$SGE_CELL" \
                HPC_TEST_SGE_QUEUE "$SGE_QUEUE"
        fi
        echo "# up: ${up[*]:-nothing}"
    } >"$tmp"
    chmod 644 "$tmp"
    mv "$tmp" "$ENV_FILE"
}

# ---------------------------------------------------------------- main

main() {
    local cmd=${1:-} s t0 want=()
    [[ $# -gt 0 ]] && shift
    case $cmd in
        start | stop | status) ;;
        -h | --help | help) usage; return 0 ;;
        *) usage >&2; return 2 ;;
    esac
    (( EUID == 0 )) || die "run as root (it installs packages and starts daemons as their own users)"
    [[ $STATE =~ [[:space:]\"\'\$\\] ]] && die "HPC_SERVICES_DIR must not contain spaces or quotes: $STATE"
    for s in "$@"; do
        [[ " ${ALL_SERVICES[*]} " == *" $s "* ]] || die "unknown service '$s' (known: ${ALL_SERVICES[*]})"
    done
    [[ $cmd == status && $# -gt 0 ]] && die "status takes no service names"
    # act in a fixed order whatever the argument order: start forwards, stop backwards
    for s in "${ALL_SERVICES[@]}"; do
        if [[ $# -eq 0 || " $* " == *" $s "* ]]; then want+=("$s"); fi
    done

    install -d -m 755 "$STATE"
    if [[ $cmd != status ]]; then
        exec 9>"$STATE/.lock"
        flock -w 900 9 || die "another services.sh run holds $STATE/.lock"
    fi

    t0=$(now_ns)
    case $cmd in
        start)
            # shellcheck disable=SC2034  # read by the EXIT trap
            WRITE_ENV_ON_EXIT=1
            for s in "${want[@]}"; do "start_$s"; done
            write_env
            echo "env:      $ENV_FILE (total $(since "$t0"))"
            ;;
        stop)
            # shellcheck disable=SC2034  # read by the EXIT trap
            WRITE_ENV_ON_EXIT=1
            for (( i = ${#want[@]} - 1; i >= 0; i-- )); do "stop_${want[i]}"; done
            write_env
            ;;
        status)
            for s in "${ALL_SERVICES[@]}"; do "status_$s"; done
            ;;
    esac
}

main "$@"
