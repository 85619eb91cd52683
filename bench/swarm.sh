#!/usr/bin/env bash
# Swarm benchmark: get the same file F onto N emulated hosts at once, three ways:
#   dfp2p  - nginx origin + supernode + one dfdaemon per host; all hosts run `dfget -O` together
#   http   - every host curls the file straight from the origin
#   bt     - aria2c BitTorrent: aria2c seeder on the origin host, opentracker (whitelist) tracker,
#            torrent made by mktorrent, N aria2c leechers started together
#
# Each host is a network namespace with one veth into a bridge that lives in its own namespace
# (dfb-br); the root namespace is not touched. Upload of every host and of the origin is
# limited by htb on the host's veth egress at RATE; download is not limited.
#
# Usage (root):   bench/swarm.sh [--quick] [-h]
# Environment:    N=16 F_MIB=256 RATE=100mbit VARIANTS=dfp2p,bt,http KEEP_LOGS=DIR
#                 BIN_DIR=/tmp/dfp2p-bin  (supernode, dfdaemon, dfget)
#                 VARIANT_TIMEOUT=seconds (default: 3 x N*F/u + 120)
#                 U_MBIT=...  skip the goodput calibration and use this u (Mbit/s)
#                 BENCH_MD=1|0  write the section of BENCHMARKS.md (default 1; 0 in --quick)
#                 NO_INSTALL=1  never run apt-get
#                 DAEMON_ARGS / SUPERNODE_ARGS  extra flags for every dfdaemon / the supernode
#                 DAEMON_THREADS=1  worker threads per dfdaemon: N daemons share this machine's
#                               CPUs, so each host has a fraction of one (aria2c runs one thread)
#                 CPU_LIMIT=1.5  hold everything the harness starts to this many CPUs (a cgroup
#                               cpu quota): a slower or busier machine, on demand
#                 ORIGIN_CC=cubic  TCP congestion control of the origin's namespace (nginx and
#                               the BitTorrent seeder); default: what the machine uses
#                 WAIT_IDLE=S   before each variant wait up to S s for the machine to be
#                               under IDLE_BUSY % (default 25) busy (other builds skew results)
# --quick:        N=4 F_MIB=64 VARIANTS=dfp2p BENCH_MD=0 (for CI). In every mode the exit
#                 status is non-zero if any host got wrong bytes or failed, or if the dfp2p
#                 origin egress exceeded 1.1 F.
set -uo pipefail

QUICK=0
for a in "$@"; do
    case "$a" in
        --quick) QUICK=1 ;;
        -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "swarm.sh: unknown argument: $a" >&2; exit 2 ;;
    esac
done
if [ "$QUICK" = 1 ]; then
    N=${N:-4}; F_MIB=${F_MIB:-64}; VARIANTS=${VARIANTS:-dfp2p}; BENCH_MD=${BENCH_MD:-0}
fi
N=${N:-16}
F_MIB=${F_MIB:-256}
RATE=${RATE:-100mbit}
VARIANTS=${VARIANTS:-dfp2p,bt,http}
KEEP_LOGS=${KEEP_LOGS:-}
BENCH_MD=${BENCH_MD:-1}
NO_INSTALL=${NO_INSTALL:-0}
U_MBIT=${U_MBIT:-}
VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-}
DAEMON_THREADS=${DAEMON_THREADS:-1}
CPU_LIMIT=${CPU_LIMIT:-}
ORIGIN_CC=${ORIGIN_CC:-}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BIN_DIR=${BIN_DIR:-}
if [ -z "$BIN_DIR" ]; then
    if [ -x /tmp/dfp2p-bin/dfdaemon ]; then BIN_DIR=/tmp/dfp2p-bin
    else BIN_DIR=${CARGO_TARGET_DIR:-$REPO/target}/release; fi
fi
PY=${PYTHON:-/usr/bin/python3}
[ -x "$PY" ] || PY=$(command -v python3)
HELPER="$HERE/swarm_report.py"
CMDLINE="$(printf '%s ' N="$N" F_MIB="$F_MIB" RATE="$RATE" VARIANTS="$VARIANTS")"
for _v in U_MBIT CPU_LIMIT ORIGIN_CC VARIANT_TIMEOUT WAIT_IDLE IDLE_BUSY; do
    [ -n "${!_v:-}" ] && CMDLINE+="$_v=${!_v} "
done
CMDLINE+="bench/swarm.sh$( [ "$QUICK" = 1 ] && echo ' --quick')"

PFX=dfb
BR_NS=$PFX-br
ORIGIN_NS=$PFX-origin
CTL_NS=$PFX-ctl
ORIGIN_IP=10.77.0.1
CTL_IP=10.77.0.2
SN_PORT=8002
SN_API=8080
TRK_PORT=6969
CG=/sys/fs/cgroup/cpuacct/dfb-swarm
CPU_CG=/sys/fs/cgroup/cpu/dfb-swarm
LOCK=/run/dfb-swarm.lock

PIDS=()
WORK=
FAIL=0

log()  { printf '[swarm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die()  { log "ERROR: $*"; exit 1; }
host_ns() { echo "$PFX-h$1"; }
host_ip() { echo "10.77.1.$1"; }

# ---------------------------------------------------------------- cleanup
kill_pid() {   # TERM, wait up to 3 s, KILL
    local p=$1 i
    kill -0 "$p" 2>/dev/null || return 0
    kill -TERM "$p" 2>/dev/null
    for i in $(seq 30); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
}

# A recorded PID is signalled only while it is still this shell's live (not zombie) child, so
# a PID reused by another process after our child ended is never touched.
live_child() {
    local st
    st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    st=${st##*) }          # fields after "pid (comm) ": state ppid ...
    set -- $st
    [ "${2:-}" = "$$" ] && [ "$1" != Z ]
}

stop_pids() {  # stop the recorded PIDs given as args (our children)
    local p i live=()
    for p in "$@"; do live_child "$p" && live+=("$p"); done
    [ ${#live[@]} -gt 0 ] || return 0
    for p in "${live[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for p in "${live[@]}"; do
        for i in $(seq 30); do live_child "$p" || break; sleep 0.1; done
        live_child "$p" && kill -KILL "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done
    return 0
}

# Every namespace named dfb-* is ours: end the processes inside (by id) and delete it.
cleanup_namespaces() {
    local ns p
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$PFX-"); do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$p" 2>/dev/null; done
    done
    sleep 0.3
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$PFX-"); do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill_pid "$p"; done
        ip netns del "$ns" 2>/dev/null
    done
}

cleanup_cgroup() {
    [ -d "$CG" ] || return 0
    echo $$ > /sys/fs/cgroup/cpuacct/cgroup.procs 2>/dev/null
    local p
    for p in $(cat "$CG/cgroup.procs" 2>/dev/null); do
        echo "$p" > /sys/fs/cgroup/cpuacct/cgroup.procs 2>/dev/null
    done
    rmdir "$CG" 2>/dev/null
    if [ -d "$CPU_CG" ]; then
        for p in $(cat "$CPU_CG/cgroup.procs" 2>/dev/null); do
            echo "$p" > /sys/fs/cgroup/cpu/cgroup.procs 2>/dev/null
        done
        rmdir "$CPU_CG" 2>/dev/null
    fi
    return 0
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [ ${#PIDS[@]} -gt 0 ] && stop_pids "${PIDS[@]}"
    cleanup_namespaces
    echo $$ > /sys/fs/cgroup/cpu/cgroup.procs 2>/dev/null
    cleanup_cgroup
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ -n "$KEEP_LOGS" ]; then
            local dst
            dst="$KEEP_LOGS/swarm-$(date +%Y%m%d-%H%M%S)"
            mkdir -p "$dst" && tar -C "$WORK" -cf - --exclude='*.bin' --exclude='./dfp2p/*/data' \
                --exclude='*.fifo' --exclude='*.sock' . 2>/dev/null | tar -C "$dst" -xf -
            log "logs kept in $dst"
        fi
        rm -rf "$WORK"
    fi
    exit "$rc"
}

# ---------------------------------------------------------------- preflight
preflight() {
    [ "$(id -u)" = 0 ] || die "must run as root (network namespaces, tc)"
    case "$N" in ''|*[!0-9]*) die "N must be a number" ;; esac
    [ "$N" -ge 1 ] && [ "$N" -le 250 ] || die "N must be 1..250"
    case "$F_MIB" in ''|*[!0-9]*) die "F_MIB must be a whole number of MiB" ;; esac
    if [ -n "$CPU_LIMIT" ]; then
        "$PY" -c "import sys; sys.exit(0 if 0.1 <= float('$CPU_LIMIT') <= $(nproc) else 1)" 2>/dev/null \
            || die "CPU_LIMIT must be a number of CPUs, 0.1..$(nproc)"
        [ -f /sys/fs/cgroup/cpu/cpu.cfs_quota_us ] \
            || die "CPU_LIMIT needs the cgroup v1 cpu controller at /sys/fs/cgroup/cpu"
    fi
    local v need_pkgs=() pkg cmd
    for v in ${VARIANTS//,/ }; do
        case "$v" in dfp2p|mirror|http|bt) ;; *) die "unknown variant '$v' (dfp2p, mirror, http, bt)" ;; esac
    done
    for pair in nginx:nginx-light curl:curl tc:iproute2; do
        cmd=${pair%%:*}; pkg=${pair#*:}
        command -v "$cmd" >/dev/null || need_pkgs+=("$pkg")
    done
    if [[ ",$VARIANTS," == *,bt,* ]]; then
        for pair in aria2c:aria2 mktorrent:mktorrent opentracker:opentracker; do
            cmd=${pair%%:*}; pkg=${pair#*:}
            command -v "$cmd" >/dev/null || need_pkgs+=("$pkg")
        done
    fi
    "$PY" -c 'import matplotlib' 2>/dev/null || need_pkgs+=(python3-matplotlib)
    if [ ${#need_pkgs[@]} -gt 0 ]; then
        if [ "$NO_INSTALL" = 1 ]; then
            log "missing packages (NO_INSTALL=1): ${need_pkgs[*]}"
        else
            log "installing: ${need_pkgs[*]}"
            apt-get install -y --no-install-recommends "${need_pkgs[@]}" >/dev/null 2>&1 || {
                apt-get update -q >/dev/null 2>&1
                apt-get install -y --no-install-recommends "${need_pkgs[@]}" >/dev/null 2>&1
            } || log "apt-get install failed for: ${need_pkgs[*]}"
        fi
    fi
    for cmd in nginx curl tc ip timeout sha256sum; do
        command -v "$cmd" >/dev/null || die "required command missing: $cmd"
    done
    if [[ ",$VARIANTS," == *,bt,* ]]; then
        for cmd in aria2c mktorrent opentracker; do
            command -v "$cmd" >/dev/null || die "bt variant needs $cmd"
        done
    fi
    if [[ ",$VARIANTS," == *,dfp2p,* || ",$VARIANTS," == *,mirror,* ]]; then
        for b in supernode dfdaemon dfget; do
            [ -x "$BIN_DIR/$b" ] || die "dfp2p binary missing: $BIN_DIR/$b (set BIN_DIR)"
        done
    fi
    "$PY" -c 'import matplotlib' 2>/dev/null || log "WARNING: $PY has no matplotlib: no PNG plot"
}

# ---------------------------------------------------------------- network
add_node() {   # ns ip shape(0|1)
    local ns=$1 ip=$2 shape=$3 port="v-${1#$PFX-}"
    ip netns add "$ns" || return 1
    ip -n "$ns" link set lo up || return 1
    ip -n "$BR_NS" link add "$port" type veth peer name eth0 netns "$ns" || return 1
    ip -n "$BR_NS" link set "$port" master br0 up || return 1
    ip -n "$ns" addr add "$ip/16" dev eth0 || return 1
    ip -n "$ns" link set eth0 up || return 1
    if [ "$shape" = 1 ]; then
        tc -n "$ns" qdisc add dev eth0 root handle 1: htb default 1 || return 1
        tc -n "$ns" class add dev eth0 parent 1: classid 1:1 htb rate "$RATE" ceil "$RATE" \
            quantum 60000 || return 1
    fi
}

setup_network() {
    log "network: bridge ns $BR_NS, origin $ORIGIN_IP, control $CTL_IP, $N hosts, upload $RATE (htb)"
    ip netns add "$BR_NS" || die "ip netns add failed"
    ip -n "$BR_NS" link set lo up
    ip -n "$BR_NS" link add br0 type bridge || die "cannot create bridge"
    ip -n "$BR_NS" link set br0 up
    add_node "$ORIGIN_NS" "$ORIGIN_IP" 1 || die "origin namespace setup failed"
    if [ -n "$ORIGIN_CC" ]; then
        # Per route: a namespace may only pick from the host's allowed list by sysctl.
        ip -n "$ORIGIN_NS" route replace 10.77.0.0/16 dev eth0 src "$ORIGIN_IP" congctl "$ORIGIN_CC" \
            || die "ORIGIN_CC=$ORIGIN_CC: setting it failed (available: $(cat /proc/sys/net/ipv4/tcp_available_congestion_control))"
    fi
    add_node "$CTL_NS" "$CTL_IP" 0 || die "control namespace setup failed"
    local i
    for i in $(seq "$N"); do
        add_node "$(host_ns "$i")" "$(host_ip "$i")" 1 || die "host $i namespace setup failed"
    done
}

check_reach() {   # every host reaches the origin's nginx (bridge ports forwarding)
    local i
    for i in $(seq "$N"); do
        wait_until 10 "host $i to reach the origin" ip netns exec "$(host_ns "$i")" \
            curl -sf --max-time 2 -o /dev/null -r 0-0 "http://$ORIGIN_IP/file.bin" \
            || die "host $i cannot reach the origin"
    done
}

# start_bg NAME NS TIMEOUT_S cmd...  -> background, PID recorded, output to $WORK/logs/NAME.log
start_bg() {
    local name=$1 ns=$2 tmo=$3; shift 3
    ip netns exec "$ns" timeout -k 5 "$tmo" "$@" > "$WORK/logs/$name.log" 2>&1 8>&- &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

wait_until() {  # seconds description cmd...
    local secs=$1 what=$2; shift 2
    local end=$((SECONDS + secs))
    while [ $SECONDS -lt $end ]; do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    log "timed out after ${secs}s waiting for $what"
    return 1
}

# "bytes segments" the origin's htb sent. Unlike the veth's tx_bytes, which counts one
# header per GSO batch, the qdisc counts every segment with its headers, as a wire would.
origin_qdisc_tx() { tc -n "$ORIGIN_NS" -s qdisc show dev eth0 | awk '/Sent/ { print $2, $4; exit }'; }
origin_tcp() {   # "OutSegs RetransSegs" of the origin namespace's TCP
    ip netns exec "$ORIGIN_NS" awk '/^Tcp:/ { if (!h) { for (i = 1; i <= NF; i++) c[$i] = i; h = 1 }
        else print $c["OutSegs"], $c["RetransSegs"] }' /proc/net/snmp
}
cpu_line() { head -1 /proc/stat; }
# UDP datagrams the hosts' kernels dropped because a socket's receive buffer was full
# (summed over the host namespaces). QUIC counts each as lost and sends it again; in the
# 16-host runs the slow ones are those with thousands of these.
hosts_udp_drops() {
    local i sum=0 n
    for i in $(seq "$N"); do
        n=$(ip netns exec "$(host_ns "$i")" awk '/^Udp:/ { if (!h) { for (i = 1; i <= NF; i++) c[$i] = i; h = 1 }
            else print $c["RcvbufErrors"] }' /proc/net/snmp 2>/dev/null)
        sum=$((sum + ${n:-0}))
    done
    echo "$sum"
}
# This VM's speed: MiB/s of one core hashing the test file. It swings between runs (the
# same sha256sum ran at 169 to 335 MiB/s within two hours), and a CPU-bound variant slows
# with it, so each variant records it before and after.
speed_probe() {
    local t0=$EPOCHREALTIME
    sha256sum "$WORK/www/file.bin" > /dev/null
    awk -v a="$t0" -v b="$EPOCHREALTIME" -v m="$F_MIB" 'BEGIN { printf "%.0f", m / (b - a) }'
}
cg_usage() { cat "$CG/cpuacct.usage" 2>/dev/null || echo 0; }

start_origin() {
    local ng=$WORK/nginx
    mkdir -p "$ng/tmp"
    cat > "$ng/nginx.conf" <<EOF
worker_processes 2;
daemon off;
pid $ng/nginx.pid;
error_log $ng/error.log warn;
events { worker_connections 4096; }
http {
    types { application/octet-stream bin; }
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    client_body_temp_path $ng/tmp/body;
    proxy_temp_path $ng/tmp/proxy;
    log_format bench '\$msec \$remote_addr \$status \$body_bytes_sent "\$http_range" \$request_time';
    access_log $ng/access.log bench;
    server {
        listen $ORIGIN_IP:80;
        server_name _;
        root $WORK/www;
        location / { }
    }
}
EOF
    start_bg nginx "$ORIGIN_NS" 86400 nginx -e "$ng/error.log" -p "$ng" -c "$ng/nginx.conf"
    wait_until 15 "nginx on the origin" ip netns exec "$ORIGIN_NS" \
        curl -sf -o /dev/null -r 0-0 "http://$ORIGIN_IP/file.bin" \
        || { tail -5 "$ng/error.log" "$WORK/logs/nginx.log" >&2; die "origin nginx did not start"; }
}

access_lines() { wc -l < "$WORK/nginx/access.log" 2>/dev/null || echo 0; }

calibrate() {
    if [ -n "$U_MBIT" ]; then
        U_BPS=$("$PY" -c "print(int(float('$U_MBIT')*1e6))"); U_SRC="given (U_MBIT)"; return
    fi
    local bytes=$((32 * 1048576))
    [ "$FILE_BYTES" -lt "$bytes" ] && bytes=$FILE_BYTES
    local out
    out=$(ip netns exec "$(host_ns 1)" timeout 120 curl -sf -o /dev/null -r "0-$((bytes - 1))" \
        -w '%{size_download} %{time_total} %{time_starttransfer}' "http://$ORIGIN_IP/file.bin") \
        || die "calibration download failed"
    U_BPS=$("$PY" -c "s,t,f='$out'.split(); print(int(float(s)*8/(float(t)-float(f))))")
    U_SRC="measured: TCP goodput of one ${bytes}-byte curl origin->h1 through htb $RATE"
    log "u = $("$PY" -c "print(round($U_BPS/1e6,1))") Mbit/s ($U_SRC)"
}

# ---------------------------------------------------------------- common per-variant parts
# job script: wait for the go file, then run the command and write "start end rc" to RESFILE
write_job_script() {
    cat > "$WORK/job.sh" <<'EOF'
#!/bin/bash
# job.sh GOFILE SLEEPFIFO RESFILE cmd...
go=$1 fifo=$2 res=$3; shift 3
exec 3<>"$fifo"
: > "$res.ready"
until [ -e "$go" ]; do read -r -t 0.005 -u 3 _; done
s=$EPOCHREALTIME
echo "$s" > "$res.start"
"$@"
rc=$?
e=$EPOCHREALTIME
echo "$s $e $rc" > "$res.tmp" && mv "$res.tmp" "$res"
EOF
    chmod +x "$WORK/job.sh"
    rm -f "$WORK/sleep.fifo"; mkfifo "$WORK/sleep.fifo"
}

# variant bookkeeping
begin_variant() {   # name
    VN=$1
    VD=$WORK/res/$VN
    rm -rf "$VD"; mkdir -p "$VD"
    META=$VD/meta.env
    : > "$META"
    meta variant "$VN"
    VSTATUS=ok
    VERR=
    VPIDS=()
    meta pre_busy "${PRE_BUSY:-}"
    meta speed_before "$(speed_probe)"
}
meta() { printf '%s=%s\n' "$1" "$2" >> "$META"; }
meta_get() { awk -F= -v k="$1" '$1==k {sub(/^[^=]*=/,""); print; exit}' "$META"; }
vfail() { VSTATUS=failed; VERR="${VERR:+$VERR; }$*"; log "[$VN] FAILED: $*"; }

# spawn N jobs (each: ns, command) waiting for the common go file; record PIDs in JOBPIDS
# usage: spawn_jobs CMD_FUNC ; CMD_FUNC i prints nothing, sets array JOBCMD
spawn_jobs() {
    local fn=$1 i
    rm -f "$VD/go"
    JOBPIDS=()
    for i in $(seq "$N"); do
        "$fn" "$i"
        ip netns exec "$(host_ns "$i")" timeout -k 5 "$VTMO" \
            "$WORK/job.sh" "$VD/go" "$WORK/sleep.fifo" "$VD/h$i.time" "${JOBCMD[@]}" \
            > "$WORK/logs/$VN-h$i.log" 2>&1 8>&- &
        JOBPIDS+=($!); PIDS+=($!)
    done
    local k=0
    while :; do
        local ready=0
        for i in $(seq "$N"); do [ -e "$VD/h$i.time.ready" ] && ready=$((ready + 1)); done
        [ "$ready" = "$N" ] && break
        k=$((k + 1)); [ $k -gt 300 ] && { vfail "only $ready of $N jobs got ready"; break; }
        sleep 0.1
    done
    sleep 0.3
}

start_sampler() {   # 1-s /proc/stat samples during the variant
    ( exec timeout "$VTMO" bash -c 'exec 3<>"$1"; while :; do echo "$EPOCHREALTIME $(head -1 /proc/stat)"; read -r -t 1 -u 3 _; done' _ "$WORK/sleep.fifo" ) > "$VD/cpu.log" 2>/dev/null 8>&- &
    SAMPLER=$!; PIDS+=($SAMPLER)
}

go_now() {   # record counters and release all jobs
    meta qtx0 "$(origin_qdisc_tx)"
    meta tcp0 "$(origin_tcp)"
    meta udpdrop0 "$(hosts_udp_drops)"
    meta acc0 "$(access_lines)"
    meta cg0 "$(cg_usage)"
    meta stat0 "$(cpu_line)"
    start_sampler
    T0=$EPOCHREALTIME
    : > "$VD/go"
    meta t0 "$T0"
}

end_counters() {
    meta t1 "$EPOCHREALTIME"
    meta stat1 "$(cpu_line)"
    meta cg1 "$(cg_usage)"
    meta qtx1 "$(origin_qdisc_tx)"
    meta tcp1 "$(origin_tcp)"
    meta udpdrop1 "$(hosts_udp_drops)"
    meta acc1 "$(access_lines)"
    stop_pids "$SAMPLER"
    local a0 a1
    a0=$(meta_get acc0); a1=$(meta_get acc1)
    if [ "$a1" -gt "$a0" ]; then sed -n "$((a0 + 1)),${a1}p" "$WORK/nginx/access.log" > "$VD/access.log"
    else : > "$VD/access.log"; fi
}

# verify outputs: host i's file at path given by function OUTPATH_FN i
verify_outputs() {   # fn
    local fn=$1 i f
    : > "$VD/sha.txt"
    for i in $(seq "$N"); do
        f=$("$fn" "$i")
        if [ -f "$f" ]; then printf '%s\0' "$f"; fi
    done | xargs -0 -r -P 2 -n 4 sha256sum >> "$VD/sha.txt" 2>/dev/null
    : > "$VD/times.tsv"
    local bad=0
    for i in $(seq "$N"); do
        f=$("$fn" "$i")
        local sum ok=0 s=nan e=nan rc=timeout
        sum=$(awk -v f="$f" '$2==f {print $1}' "$VD/sha.txt")
        [ "$sum" = "$FILE_SHA" ] && ok=1
        if [ -s "$VD/h$i.time" ]; then read -r s e rc < "$VD/h$i.time"; fi
        if [ "$ok" != 1 ] || [ "$rc" != 0 ]; then
            bad=$((bad + 1))
            log "[$VN] h$i: exit=$rc sha_ok=$ok; last lines of its logs:"
            tail -n 3 "$WORK/logs/$VN-h$i.log" "$VD"/*-h$i.log 2>/dev/null | sed 's/^/    /' >&2
        fi
        printf 'h%s\t%s\t%s\t%s\t%s\n' "$i" "$s" "$e" "$rc" "$ok" >> "$VD/times.tsv"
        rm -f "$f"
    done
    [ "$bad" -gt 0 ] && vfail "$bad of $N hosts did not get correct bytes (see times.tsv: rc / sha)"
    return 0
}

end_variant() {
    meta speed_after "$(speed_probe)"
    meta status "$VSTATUS"
    meta error "$VERR"
    [ "$VSTATUS" = ok ] || FAIL=1
    sync
}

wait_jobs() {   # wait for all job PIDs
    local p
    for p in "${JOBPIDS[@]}"; do wait "$p" 2>/dev/null; done
}

# ---------------------------------------------------------------- variant: dfp2p
dfp2p_cmd() {
    local d=$WORK/dfp2p/h$1
    JOBCMD=("$BIN_DIR/dfget" "http://$ORIGIN_IP/file.bin" -O "$d/out/file.bin"
            --daemon-sock "$d/dfdaemon.sock" --no-progress)
}
dfp2p_out() { echo "$WORK/dfp2p/h$1/out/file.bin"; }
# The containerd path: the same bytes as an OCI blob, through the host's registry mirror.
mirror_cmd() {
    local d=$WORK/mirror/h$1
    JOBCMD=(curl -sS --fail -o "$d/out/file.bin"
            "http://127.0.0.1:65001/v2/bench/app/blobs/sha256:$FILE_SHA?ns=$ORIGIN_IP")
}
mirror_out() { echo "$WORK/mirror/h$1/out/file.bin"; }

daemon_healthy() { curl -sf --max-time 2 --unix-socket "$1" http://x/healthz; }
sn_hosts() {
    ip netns exec "$CTL_NS" curl -sf --max-time 2 "http://$CTL_IP:$SN_API/api/v1/hosts" \
        | "$PY" -c 'import json,sys; d=json.load(sys.stdin); d=d.get("hosts",d) if isinstance(d,dict) else d; print(len(d))'
}
sn_has_hosts() { [ "$(sn_hosts 2>/dev/null)" = "$N" ]; }

variant_dfp2p() { daemons_variant dfp2p dfp2p_cmd dfp2p_out; }
variant_mirror() { daemons_variant mirror mirror_cmd mirror_out; }

# A supernode and a dfdaemon per host; clients started with $2, outputs found with $3.
daemons_variant() {   # name cmdfn outfn
    begin_variant "$1"
    local cmdfn=$2 outfn=$3
    DW=$WORK/$1
    local sn=$DW/sn i
    rm -rf "$DW"; mkdir -p "$sn"
    meta placement "supernode in $CTL_NS ($CTL_IP, not shaped); one dfdaemon per host namespace ($DAEMON_THREADS worker thread(s) each)"
    start_bg supernode "$CTL_NS" "$((VTMO + 120))" "$BIN_DIR/supernode" \
        --listen "$CTL_IP:$SN_PORT" --api-listen "$CTL_IP:$SN_API" --data-dir "$sn" \
        ${SUPERNODE_ARGS:-}
    local snpid=$LAST_PID
    VPIDS+=("$snpid")
    if ! wait_until 30 "supernode healthz" ip netns exec "$CTL_NS" curl -sf "http://$CTL_IP:$SN_API/healthz" \
        || ! wait_until 10 "supernode CA" test -s "$sn/ca-key.pem"; then
        tail -20 "$WORK/logs/supernode.log" >&2
        vfail "supernode did not start"; end_variant; stop_pids "${VPIDS[@]}"; return
    fi
    for i in $(seq "$N"); do
        local d=$DW/h$i
        mkdir -p "$d/data" "$d/out"
        start_bg "dfdaemon-h$i" "$(host_ns "$i")" "$((VTMO + 120))" "$BIN_DIR/dfdaemon" \
            --supernode "$CTL_IP:$SN_PORT" --data-dir "$d/data" --host-id "h$i" \
            --peer-listen "$(host_ip "$i"):65000" --api-sock "$d/dfdaemon.sock" \
            --proxy-listen 127.0.0.1:65001 --ca-cert "$sn/ca.pem" --ca-key "$sn/ca-key.pem" \
            --plain-http-registry "$ORIGIN_IP" --worker-threads "$DAEMON_THREADS" \
            ${DAEMON_ARGS:-}
        VPIDS+=("$LAST_PID")
    done
    for i in $(seq "$N"); do
        if ! wait_until 30 "dfdaemon h$i healthz" daemon_healthy "$DW/h$i/dfdaemon.sock"; then
            tail -20 "$WORK/logs/dfdaemon-h$i.log" >&2
            vfail "dfdaemon h$i did not become healthy"; end_variant; stop_pids "${VPIDS[@]}"; return
        fi
    done
    wait_until 20 "supernode to list $N hosts" sn_has_hosts \
        || log "[dfp2p] note: supernode /api/v1/hosts lists $(sn_hosts 2>/dev/null || echo '?') hosts (continuing)"
    spawn_jobs "$cmdfn"
    go_now
    log "[$VN] $N clients started"
    wait_jobs
    end_counters
    # metrics and scheduler state
    for i in $(seq "$N"); do
        curl -sf --max-time 5 --unix-socket "$DW/h$i/dfdaemon.sock" http://x/metrics \
            > "$VD/h$i.metrics" 2>/dev/null
    done
    ip netns exec "$CTL_NS" curl -sf --max-time 5 "http://$CTL_IP:$SN_API/metrics" > "$VD/supernode.metrics" 2>/dev/null
    ip netns exec "$CTL_NS" curl -sf --max-time 5 "http://$CTL_IP:$SN_API/api/v1/tasks" > "$VD/tasks.json" 2>/dev/null
    ip netns exec "$CTL_NS" curl -sf --max-time 5 "http://$CTL_IP:$SN_API/api/v1/hosts" > "$VD/hosts.json" 2>/dev/null
    stop_pids "${VPIDS[@]}"
    # warnings and errors in the logs
    grep -hE '\b(WARN|ERROR)\b' "$WORK"/logs/dfdaemon-h*.log "$WORK/logs/supernode.log" > "$VD/warnings.txt" 2>/dev/null
    for i in $(seq "$N"); do
        cp "$WORK/logs/dfdaemon-h$i.log" "$VD/dfdaemon-h$i.log" 2>/dev/null
        cp "$WORK/logs/dfp2p-h$i.log" "$VD/dfget-h$i.log" 2>/dev/null
    done
    cp "$WORK/logs/supernode.log" "$VD/supernode.log" 2>/dev/null
    verify_outputs "$outfn"
    rm -rf "$DW"
    end_variant
}

# ---------------------------------------------------------------- variant: direct HTTP
http_cmd() {
    JOBCMD=(curl -sS --fail -o "$WORK/http/h$1/file.bin" "http://$ORIGIN_IP/file.bin")
}
http_out() { echo "$WORK/http/h$1/file.bin"; }

variant_http() {
    begin_variant http
    local i
    rm -rf "$WORK/http"
    for i in $(seq "$N"); do mkdir -p "$WORK/http/h$i"; done
    meta placement "curl in every host namespace, straight from nginx on the origin"
    spawn_jobs http_cmd
    go_now
    log "[http] $N x curl started"
    wait_jobs
    end_counters
    for i in $(seq "$N"); do cp "$WORK/logs/http-h$i.log" "$VD/curl-h$i.log" 2>/dev/null; done
    verify_outputs http_out
    rm -rf "$WORK/http"
    end_variant
}

# ---------------------------------------------------------------- variant: BitTorrent (aria2c)
ARIA_COMMON=(--enable-dht=false --enable-dht6=false --bt-enable-lpd=false --seed-ratio=0.0
             --file-allocation=none --summary-interval=0 --console-log-level=warn
             --bt-stop-timeout=0 --follow-torrent=false --check-certificate=false --disable-ipv6=true)
bt_cmd() {
    local d=$WORK/bt/h$1
    JOBCMD=(aria2c "${ARIA_COMMON[@]}" --dir="$d/out" --log="$d/aria2.log" --log-level=notice
            --listen-port=6881 --on-bt-download-complete="$d/hook.sh" "$WORK/bt/file.torrent")
}
bt_out() { echo "$WORK/bt/h$1/out/file.bin"; }
bt_seeded() {
    ip netns exec "$CTL_NS" "$PY" "$HELPER" scrape "http://$CTL_IP:$TRK_PORT/scrape" "$INFOHASH" \
        | grep -q '^complete=[1-9]'
}

variant_bt() {
    begin_variant bt
    local bt=$WORK/bt i
    rm -rf "$bt"; mkdir -p "$bt/trk"; chmod 755 "$bt" "$bt/trk"
    meta placement "opentracker in $CTL_NS ($CTL_IP, not shaped, whitelist); aria2c seeder on the origin host; aria2c leechers keep seeding until every host is done"
    if ! mktorrent -a "http://$CTL_IP:$TRK_PORT/announce" -o "$bt/file.torrent" "$WORK/www/file.bin" \
            > "$WORK/logs/mktorrent.log" 2>&1; then
        vfail "mktorrent failed: $(tail -2 "$WORK/logs/mktorrent.log")"; end_variant; return
    fi
    INFOHASH=$("$PY" "$HELPER" infohash "$bt/file.torrent") || { vfail "cannot read info-hash"; end_variant; return; }
    meta infohash "$INFOHASH"
    meta piece_len "$("$PY" "$HELPER" piecelen "$bt/file.torrent")"
    echo "$INFOHASH" > "$bt/trk/whitelist"
    start_bg opentracker "$CTL_NS" "$((VTMO + 120))" opentracker -i "$CTL_IP" -p "$TRK_PORT" -P "$TRK_PORT" \
        -d "$bt/trk" -u nobody -w whitelist
    VPIDS+=("$LAST_PID")
    start_bg bt-seeder "$ORIGIN_NS" "$((VTMO + 120))" aria2c "${ARIA_COMMON[@]}" --dir="$WORK/www" \
        --bt-seed-unverified=true --log="$WORK/logs/bt-seeder-aria2.log" --log-level=notice \
        --listen-port=6881 "$bt/file.torrent"
    VPIDS+=("$LAST_PID")
    if ! wait_until 30 "the seeder to show up at the tracker" bt_seeded; then
        tail -5 "$WORK/logs/opentracker.log" "$WORK/logs/bt-seeder.log" >&2
        vfail "seeder/tracker not ready"; end_variant; stop_pids "${VPIDS[@]}"; return
    fi
    for i in $(seq "$N"); do
        mkdir -p "$bt/h$i/out"
        printf '#!/bin/sh\ndate +%%s.%%N > %s/done.tmp && mv %s/done.tmp %s/done\n' \
            "$bt/h$i" "$bt/h$i" "$bt/h$i" > "$bt/h$i/hook.sh"
        chmod +x "$bt/h$i/hook.sh"
    done
    spawn_jobs bt_cmd
    go_now
    log "[bt] $N x aria2c started"
    # aria2c seeds on after completion: wait for every hook (or for all leechers to exit)
    local end=$((SECONDS + VTMO)) done alive
    while :; do
        done=0; alive=0
        for i in $(seq "$N"); do [ -e "$bt/h$i/done" ] && done=$((done + 1)); done
        [ "$done" = "$N" ] && break
        for p in "${JOBPIDS[@]}"; do live_child "$p" && alive=$((alive + 1)); done
        [ "$alive" = 0 ] && break
        [ $SECONDS -ge $end ] && { vfail "timed out after ${VTMO}s with $done of $N done"; break; }
        sleep 0.2
    done
    end_counters
    stop_pids "${JOBPIDS[@]}" "${VPIDS[@]}"
    # completion time = hook time; start = job start
    for i in $(seq "$N"); do
        local s=nan e=nan rc=incomplete
        if [ -s "$bt/h$i/done" ]; then e=$(cat "$bt/h$i/done"); rc=0; s=$(meta_get t0); fi
        echo "$s $e $rc" > "$VD/h$i.time"
        cp "$bt/h$i/aria2.log" "$VD/aria2-h$i.log" 2>/dev/null
    done
    cp "$WORK/logs/bt-seeder-aria2.log" "$VD/aria2-seeder.log" 2>/dev/null
    verify_outputs bt_out
    rm -rf "$bt"
    end_variant
}

# Busy % of the whole machine over 2 s; with WAIT_IDLE=S wait up to S seconds for it to drop
# below IDLE_BUSY (default 25%) before a variant (another build on the machine skews results).
busy2s() {
    local a b
    a=$(cpu_line); sleep 2; b=$(cpu_line)
    "$PY" - "$a" "$b" <<'PYEOF'
import sys
f = lambda l: [int(x) for x in l.split()[1:9]]
a, b = f(sys.argv[1]), f(sys.argv[2])
t = sum(b) - sum(a); i = (b[3] + b[4]) - (a[3] + a[4])
print(int(round(100 * (1 - i / t))) if t > 0 else 0)
PYEOF
}
wait_idle() {
    local end=$((SECONDS + ${WAIT_IDLE:-0})) b
    while :; do
        b=$(busy2s)
        PRE_BUSY=$b
        [ "$b" -le "${IDLE_BUSY:-25}" ] && return 0
        if [ $SECONDS -ge $end ]; then
            log "note: machine ${b}% busy before this variant (other load); results may be skewed"
            return 0
        fi
        log "machine ${b}% busy; waiting for it to calm down (WAIT_IDLE=${WAIT_IDLE:-0}s)"
        sleep 10
    done
}

# ---------------------------------------------------------------- main
main() {
    preflight
    exec 8>"$LOCK"
    flock -n 8 || die "another swarm.sh run holds $LOCK"
    trap cleanup EXIT
    trap 'log "interrupted"; exit 130' INT TERM
    cleanup_namespaces
    rm -rf /var/tmp/dfb-swarm.* 2>/dev/null
    WORK=$(mktemp -d /var/tmp/dfb-swarm.XXXXXX) || die "mktemp failed"
    chmod 755 "$WORK"
    mkdir -p "$WORK/logs" "$WORK/www" "$WORK/res"
    if mkdir -p "$CG" 2>/dev/null && echo $$ > "$CG/cgroup.procs" 2>/dev/null; then :; else
        log "note: no cpuacct cgroup; bench-process CPU will not be reported"; fi
    if [ -n "$CPU_LIMIT" ]; then
        # A 10 ms period keeps the throttling fine-grained, closer to a slower CPU than to
        # 100 ms stalls.
        mkdir -p "$CPU_CG" && echo 10000 > "$CPU_CG/cpu.cfs_period_us" \
            && echo "$("$PY" -c "print(int(round($CPU_LIMIT * 10000)))")" > "$CPU_CG/cpu.cfs_quota_us" \
            && echo $$ > "$CPU_CG/cgroup.procs" || die "cannot set up the CPU_LIMIT cgroup"
        log "harness held to $CPU_LIMIT CPUs"
    fi

    FILE_BYTES=$((F_MIB * 1048576))
    log "making $F_MIB MiB of random data"
    head -c "$FILE_BYTES" /dev/urandom > "$WORK/www/file.bin" || die "cannot write the file"
    chmod 644 "$WORK/www/file.bin"
    FILE_SHA=$(sha256sum "$WORK/www/file.bin" | cut -d' ' -f1)
    # The same bytes where a registry keeps a blob, for the mirror variant.
    mkdir -p "$WORK/www/v2/bench/app/blobs"
    ln "$WORK/www/file.bin" "$WORK/www/v2/bench/app/blobs/sha256:$FILE_SHA"

    # background CPU load before the run (other work on the machine)
    local s0 s1
    s0=$(cpu_line); sleep 2; s1=$(cpu_line)

    setup_network
    start_origin
    check_reach
    calibrate
    write_job_script
    if [ -z "$VARIANT_TIMEOUT" ]; then
        VTMO=$("$PY" -c "print(int(3*$N*$FILE_BYTES*8/$U_BPS + 120))")
    else VTMO=$VARIANT_TIMEOUT; fi

    cat > "$WORK/res/run.env" <<EOF
cmdline=$CMDLINE
date=$(date -u '+%Y-%m-%d %H:%M UTC')
n=$N
f_mib=$F_MIB
f_bytes=$FILE_BYTES
rate=$RATE
u_bps=$U_BPS
u_src=$U_SRC
variants=$VARIANTS
ncpu=$(nproc)
kernel=$(uname -r)
bg_stat0=$s0
bg_stat1=$s1
variant_timeout=$VTMO
bin_dir=$BIN_DIR
quick=$QUICK
cpu_limit=$CPU_LIMIT
EOF
    log "N=$N F=${F_MIB}MiB RATE=$RATE variants=$VARIANTS timeout/variant=${VTMO}s work=$WORK"
    sync
    local v
    for v in ${VARIANTS//,/ }; do
        log "=== variant $v ==="
        wait_idle
        "variant_$v"
    done

    # Results go to bench/results/ (RESULTS_DIR overrides; the CI run keeps them out of
    # the checkout), named by size and rate.
    local out=${RESULTS_DIR:-$HERE/results}
    [ "$QUICK" = 1 ] && out=${RESULTS_DIR:-$WORK/results}
    mkdir -p "$out"
    local stem=$out/swarm-N$N-F$F_MIB-$RATE
    local args=(report "$WORK/res" --png "$stem.png" --json "$stem.json")
    [ "$BENCH_MD" = 1 ] && args+=(--md "$REPO/BENCHMARKS.md")
    "$PY" "$HELPER" "${args[@]}" || { log "report failed"; FAIL=1; }
    "$PY" "$HELPER" check "$WORK/res" --max-egress 1.1 || FAIL=1
    if [ "$FAIL" != 0 ]; then log "FAILED (see above)"; exit 1; fi
    log "done"
}

main
