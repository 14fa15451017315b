#!/bin/bash
# Runs INSIDE `run-in-vm --systemd` (systemd 252 as PID 1), from the project
# checkout: installs dmuserd's units for real and exercises them. Prints one
# line per check, "CHECK <name> PASS|FAIL <detail>", for
# tests/vm/test_systemd_vm.py to assert on; then the unit's journal as JSON
# (checked on the host: a python start costs ~10 s under TCG).
#
#   systemd_vm_check.sh [basic|full]   full adds: a stuck (SIGSTOPped) process
#                                      killed by the watchdog and restarted,
#                                      the control socket held by a socket
#                                      unit, and the locked-down NBD-only unit.
#
# Drop-ins for the test only: WatchdogSec=6s (the shipped 10 s works too, but
# waiting past it costs TCG time), TimeoutAbortSec=2s (a SIGSTOPped process
# ignores the watchdog's SIGABRT until the SIGKILL that follows) and
# TimeoutStartSec=300s (python's start-up under TCG on a loaded host has
# taken over 60 s).
set -u
MODE=${1:-basic}
PATH=/usr/sbin:/usr/bin:/sbin:/bin
ROOT=$(pwd)
DMUSERD=${DMUSERD:-$ROOT/.venv/bin/dmuserd}
U=dmuserd@test.service
FUSEDIR=/run/dmuserd/test/fuse
FILE=$FUSEDIR/disk

check() {  # check NAME DETAIL COMMAND...
    local name=$1 detail=$2; shift 2
    if "$@" >/tmp/check.out 2>&1; then echo "CHECK $name PASS $detail"
    else echo "CHECK $name FAIL $detail: $(tr '\n' ' ' </tmp/check.out | cut -c1-400)"; fi
}
prop() { systemctl show -P "$1" "$U"; }
wait_for() {  # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -ge $deadline ] && return 1
        sleep 0.3
    done
}
active_with_file() { [ "$(prop ActiveState)" = active ] && [ -e $FILE ]; }
config() {  # config INSTANCE SIZE EXPORT: /etc/dmuserd/INSTANCE.toml, one target on a file in /var/lib/dmuserd
    printf '[targets.disk]\nbackend = { type = "file", path = "/var/lib/dmuserd/%s.img", size = "%s", create = "1" }\nexports = ["%s"]\n' \
        "$1" "$2" "$3" >/etc/dmuserd/$1.toml
}

# -- install ---------------------------------------------------------------------------
check install "dmuserd install-units" $DMUSERD install-units
mkdir -p /var/lib/dmuserd
config test 64M fuse:$FUSEDIR
mkdir -p /etc/systemd/system/$U.d
printf '[Service]\nWatchdogSec=6s\nTimeoutAbortSec=2s\nTimeoutStartSec=300s\n' >/etc/systemd/system/$U.d/test.conf
for slow in dmuserd-nbd@nbdtest dmuserd@ublktest; do
    mkdir -p /etc/systemd/system/$slow.service.d
    printf '[Service]\nTimeoutStartSec=300s\n' >/etc/systemd/system/$slow.service.d/test.conf
done
systemctl daemon-reload
check verify "systemd-analyze verify $U (instantiated, with the test drop-in)" systemd-analyze verify $U

# -- start: returns once READY=1 was sent, i.e. after the FUSE file exists ------------
check start "systemctl start returns 0" systemctl start $U
check ready_file "the FUSE file exists as soon as systemctl start returned" test -e $FILE
check active "ActiveState=active after start" test "$(prop ActiveState)" = active
PID1=$(prop MainPID)
check host_mount_ns "the service shares PID 1's mount namespace (FUSE visible to the host)" \
    test "$(readlink /proc/$PID1/ns/mnt)" = "$(readlink /proc/1/ns/mnt)"
check status_text "STATUS= reaches systemd: '$(prop StatusText)'" bash -c "systemctl show -P StatusText $U | grep -q '^serving 1 target: disk'"

# -- I/O through the FUSE file and a loop device on it --------------------------------
head -c 1048576 /dev/urandom >/tmp/pattern
check write "1 MiB written through the FUSE file (fsync)" dd if=/tmp/pattern of=$FILE bs=64k conv=fsync,notrunc status=none
check read "read back equal through the FUSE file" cmp -n 1048576 /tmp/pattern $FILE
LOOP=$(losetup --find --show --direct-io=on $FILE)
check loop_read "read back equal through $LOOP" cmp -n 1048576 /tmp/pattern $LOOP

# -- the watchdog keeps it alive -------------------------------------------------------
sleep 9
check watchdog_alive "still active, same PID, no restart after 9 s > WatchdogSec=6s" \
    test "$(prop ActiveState) $(prop MainPID) $(prop NRestarts)" = "active $PID1 0"

# -- SIGHUP: no reload, harmless -------------------------------------------------------
systemctl kill -s HUP $U
sleep 1
check sighup "SIGHUP leaves it running (same PID)" test "$(prop ActiveState) $(prop MainPID)" = "active $PID1"

# -- SIGKILL: Restart=on-failure, dead mount reclaimed, data kept ---------------------
kill -9 "$PID1"
check restart_after_kill "restarted after SIGKILL (NRestarts=1, active, FUSE file back)" \
    wait_for 60 bash -c "test \"\$(systemctl show -P NRestarts $U)\" = 1 && test \"\$(systemctl show -P ActiveState $U)\" = active && test -e $FILE"
PID2=$(prop MainPID)
check new_pid "a new main process ($PID1 -> $PID2)" test "$PID2" != "$PID1"
check data_kept "acknowledged data survived the SIGKILL (file backend)" cmp -n 1048576 /tmp/pattern $FILE
check stale_loop_gone "the loop device on the dead mount was detached" bash -c "! losetup -n -O BACK-FILE $LOOP 2>/dev/null | grep -q $FILE"

# -- a stuck event loop (SIGSTOP) misses the watchdog: killed and restarted -----------
if [ "$MODE" = full ]; then
kill -STOP "$PID2"
check watchdog_kill "a stopped process is killed by the watchdog and restarted (NRestarts=2)" \
    wait_for 60 bash -c "test \"\$(systemctl show -P NRestarts $U)\" = 2 && test \"\$(systemctl show -P ActiveState $U)\" = active && test -e $FILE"
check watchdog_logged "systemd logged the watchdog timeout" bash -c "journalctl -u $U --no-pager | grep -qi 'watchdog timeout'"
fi

# -- systemctl stop: clean ---------------------------------------------------------------
LOOP=$(losetup --find --show --direct-io=on $FILE)
check stop "systemctl stop returns 0" systemctl stop $U
check stop_result "Result=success, exit status 0, inactive: $(prop Result) $(prop ExecMainStatus) $(prop ActiveState)" \
    test "$(prop Result) $(prop ExecMainStatus) $(prop ActiveState)" = "success 0 inactive"
check unmounted "the FUSE mount is gone" bash -c "! mountpoint -q $FUSEDIR"
check loop_detached "the loop device on the FUSE file was detached by the stop" bash -c "! losetup -n -O BACK-FILE $LOOP 2>/dev/null | grep -q $FILE"

# -- a ublk export (--export ublk, no ID): /dev/ublkbN exists once systemctl start returns --
B=dmuserd@ublktest.service
config ublktest 32M ublk,queues=2
check ublk_start "systemctl start $B (ublk export, the unit's hardening as shipped)" systemctl start $B
UBLK=$(ls -d /dev/ublkb* 2>/dev/null | tr '\n' ' ')
check ublk_ready_device "the block device exists as soon as systemctl start returned: '$UBLK'" test "$UBLK" = "/dev/ublkb0 "
check ublk_io "1 MiB written (O_DIRECT, fsync) and read back equal through /dev/ublkb0" bash -c \
    "dd if=/tmp/pattern of=/dev/ublkb0 bs=64k oflag=direct conv=fsync status=none && cmp -n 1048576 /tmp/pattern /dev/ublkb0"
check ublk_stop "systemctl stop $B: Result=success, exit 0, the device deleted" bash -c \
    "systemctl stop $B && test \"\$(systemctl show -P Result $B) \$(systemctl show -P ExecMainStatus $B)\" = 'success 0' && ! test -e /dev/ublkb0 && ! test -e /sys/block/ublkb0"

# -- journald: the host checks structure and priorities -------------------------------
echo "=== JOURNAL JSON BEGIN"
journalctl -u $U -o json --no-pager --output-fields=MESSAGE,PRIORITY,SYSLOG_IDENTIFIER
echo "=== JOURNAL JSON END"

if [ "$MODE" = full ]; then
# -- socket activation: systemd holds the control socket, the daemon takes it over ------
S=dmuserd@test.socket
CTL=/run/dmuserd/test/control.sock
check sock_start "systemctl start $S" systemctl start $S
check sock_service "the service starts with the socket systemd holds" systemctl start $U
check sock_status "dmuserd status answers on it" $DMUSERD status --control-socket $CTL
systemctl stop $U
check sock_kept "after the service stopped, the socket is still there and held by systemd" \
    bash -c "test -S $CTL && test \"\$(systemctl show -P ActiveState $S)\" = active"
systemctl stop $S

# -- the NBD-only, locked-down unit ------------------------------------------------------
N=dmuserd-nbd@nbdtest.service
config nbdtest 16M nbd:/run/dmuserd/nbdtest/nbd.sock,on-stop=stop
check nbd_start "systemctl start $N" systemctl start $N
SOCK=/run/dmuserd/nbdtest/nbd.sock
check nbd_io "write + read back over NBD (qemu-io)" bash -c \
    "qemu-io -f raw -c 'write -P 0x5a 0 1M' -c 'read -P 0x5a 0 1M' 'nbd+unix:///?socket=$SOCK' | grep -q 'read 1048576/1048576'"
check nbd_private_mount_ns "the NBD unit has a mount namespace of its own" \
    test "$(readlink /proc/$(systemctl show -P MainPID $N)/ns/mnt)" != "$(readlink /proc/1/ns/mnt)"
check nbd_stop "systemctl stop $N: Result=success" bash -c "systemctl stop $N && test \"\$(systemctl show -P Result $N) \$(systemctl show -P ExecMainStatus $N)\" = 'success 0'"

echo "=== journalctl -u $N"
journalctl -u $N --no-pager -o short-monotonic | tail -30
fi

echo "=== journalctl -u $B"
journalctl -u $B --no-pager -o short-monotonic | tail -20
echo "=== journalctl -u $U"
journalctl -u $U --no-pager -o short-monotonic | tail -60
