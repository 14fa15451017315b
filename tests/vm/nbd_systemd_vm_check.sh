#!/bin/bash
# Runs INSIDE `run-in-vm --systemd` (systemd 252 as PID 1), from the project
# checkout: `systemctl restart` of the locked-down dmuserd-nbd@.service keeps
# nbdkit (in a scope of its own, systemd-run --scope) and a connected NBD
# client alive. Prints "CHECK <name> PASS|FAIL <detail>" lines for
# tests/vm/test_nbd_systemd_vm.py.
set -u
PATH=/usr/sbin:/usr/bin:/sbin:/bin
ROOT=$(pwd)
DMUSERD=${DMUSERD:-$ROOT/.venv/bin/dmuserd}
N=dmuserd-nbd@nbdkeep.service
SOCK=/run/dmuserd/nbdkeep/nbd.sock
STATE=/run/dmuserd/nbdkeep/.nbd.sock.dmuserd/nbdkit.json

check() {  # check NAME DETAIL COMMAND...
    local name=$1 detail=$2; shift 2
    if "$@" >/tmp/check.out 2>&1; then echo "CHECK $name PASS $detail"
    else echo "CHECK $name FAIL $detail: $(tr '\n' ' ' </tmp/check.out | cut -c1-400)"; fi
}
nbdkit_pid() { python3 -c "import json; print(json.load(open('$STATE'))['pid'])"; }

$DMUSERD install-units >/dev/null
mkdir -p /var/lib/dmuserd /etc/systemd/system/$N.d
printf '[Service]\nTimeoutStartSec=300s\nWatchdogSec=30s\n' >/etc/systemd/system/$N.d/test.conf
systemctl daemon-reload
cat >/etc/dmuserd/nbdkeep.toml <<TOML
[targets.disk]
backend = { type = "file", path = "/var/lib/dmuserd/nbdkeep.img", size = "16M", create = "1" }
exports = ["nbd:$SOCK,timeout=120"]
TOML
check start "systemctl start $N" systemctl start $N
PID1=$(nbdkit_pid)
check scope "nbdkit ($PID1) runs in a scope of its own, not in the service's cgroup" bash -c \
    "grep -q 'dmuserd-nbd-.*\.scope' /proc/$PID1/cgroup && ! grep -q '$N' /proc/$PID1/cgroup"

# One client, connected throughout: qemu-io reading commands from a FIFO.
mkfifo /tmp/qio
qemu-io -f raw "nbd+unix:///?socket=$SOCK" </tmp/qio >/tmp/qio.out 2>&1 &
QIO=$!
exec 3>/tmp/qio
echo "write -P 0x5a 0 1M" >&3
sleep 3
check restart "systemctl restart $N" systemctl restart $N
check same_nbdkit "the same nbdkit ($PID1) serves after the restart" bash -c "test \"\$(python3 -c \"import json; print(json.load(open('$STATE'))['pid'])\")\" = $PID1 && kill -0 $PID1"
echo "read -P 0x5a 0 1M" >&3
echo "write -P 0xa5 1M 1M" >&3
echo "read -P 0xa5 1M 1M" >&3
echo "quit" >&3
exec 3>&-
wait $QIO
check client_kept "the client connected before the restart reads, writes and reads back after it" bash -c \
    "cat /tmp/qio.out; test \$(grep -c 'read 1048576/1048576' /tmp/qio.out) = 2 && test \$(grep -c 'wrote 1048576/1048576' /tmp/qio.out) = 2 && ! grep -qi 'fail\|error' /tmp/qio.out"
check stop "systemctl stop $N: nbdkit stays (on-stop=keep)" bash -c "systemctl stop $N && kill -0 $PID1"
kill "$PID1" 2>/dev/null
echo "=== journalctl -u $N"
journalctl -u $N --no-pager -o short-monotonic | tail -30
