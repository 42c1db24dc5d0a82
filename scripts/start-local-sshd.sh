#!/usr/bin/env bash
# (from ../shared/notes/recipes, verified on this kind of machine; used by .ci/run and the tests)
# start-local-sshd.sh -- real OpenSSH sshd on 127.0.0.1:$SSH_PORT, key-only auth,
# no systemd. Idempotent. Works as root (any local user may log in with the
# key) or as an ordinary user (then only that user can log in).
# Prints the connection parameters at the end.
set -euo pipefail
LAB=${SLURMLAB_DIR:-${TMPDIR:-/tmp}/orchd-slurm}
SSH_PORT=${SSH_PORT:-2222}
D=$LAB/ssh
if ! [ -x /usr/sbin/sshd ]; then
  [ "$(id -u)" = 0 ] || { echo "openssh-server missing; install it as root" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openssh-server rsync >/dev/null 2>&1 || {
    apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openssh-server rsync >/dev/null; }
fi
mkdir -p "$D"; chmod 755 "$D"   # sshd reads authorized_keys as the target user
[ -f "$D/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$D/host_ed25519"
[ -f "$D/client_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C orchd-test -f "$D/client_ed25519"
cp "$D/client_ed25519.pub" "$D/authorized_keys"; chmod 644 "$D/authorized_keys"
# Optional extra login user. With UsePAM no, sshd refuses accounts whose
# shadow password is locked ('!', what useradd creates): set it to '*'.
if [ -n "${SSH_TEST_USER:-}" ] && [ "$(id -u)" = 0 ]; then
  id "$SSH_TEST_USER" >/dev/null 2>&1 || useradd -m -s /bin/bash "$SSH_TEST_USER"
  usermod -p '*' "$SSH_TEST_USER"
fi
# Debian's sshd refuses to start without its privilege-separation dir (root mode)
if [ "$(id -u)" = 0 ]; then mkdir -p /run/sshd; chmod 755 /run/sshd; fi
cat > "$D/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $D/host_ed25519
PidFile $D/sshd.pid
AuthorizedKeysFile $D/authorized_keys
# the key file lives under /tmp (world-writable) -> StrictModes would reject it
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
LogLevel INFO
MaxStartups 100:30:200
MaxSessions 50
EOF
/usr/sbin/sshd -t -f "$D/sshd_config"
if ! { [ -s "$D/sshd.pid" ] && kill -0 "$(cat "$D/sshd.pid")" 2>/dev/null; }; then
  /usr/sbin/sshd -f "$D/sshd_config" -E "$D/sshd.log"   # daemonises, writes PidFile
  for _ in $(seq 50); do [ -s "$D/sshd.pid" ] && break; sleep 0.1; done
fi
ssh-keyscan -p "$SSH_PORT" -t ed25519 127.0.0.1 2>/dev/null > "$D/known_hosts"
echo "sshd pid $(cat "$D/sshd.pid") on 127.0.0.1:$SSH_PORT"
echo "connect: ssh -p $SSH_PORT -i $D/client_ed25519 -o UserKnownHostsFile=$D/known_hosts $(id -un)@127.0.0.1"
