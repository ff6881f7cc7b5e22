#!/bin/bash
# start-postfix-backend.sh -- a throw-away Postfix instance used as the BACKEND MTA
# behind mppproxy in tests (or as a relaying CLIENT that sends to the proxy).
#
# * runs its own config dir + queue dir under $PFX_ROOT (default /tmp/pfx-backend),
#   never touches /etc/postfix/main.cf and never uses systemd: `postfix -c DIR start`
# * listens on 127.0.0.1:$PFX_PORT (default 10025), ipv4 only, no DNS lookups
# * accepts mail for example.com and example.net (override: PFX_DOMAINS="a.test b.test")
#   and delivers each recipient's copy into a per-domain Maildir: $PFX_ROOT/mail/<domain>/new/
#   (first headers of each file: X-Original-To: and Delivered-To: <recipient>);
#   other domains get "554 5.7.1 Relay access denied" at RCPT, even from 127.0.0.1
# * offers STARTTLS (smtpd_tls_security_level = may) with a self-signed certificate
#   generated here once: $PFX_ROOT/tls/cert.pem (CN and SAN: localhost, 127.0.0.1);
#   the Received: header records the TLS version and cipher a client used
# * announces and honours XFORWARD and XCLIENT from 127.0.0.0/8 ($PFX_XHOSTS)
# * RELAY MODE: PFX_RELAYHOST='[127.0.0.1]:10026' makes this instance a client that
#   forwards ALL mail (any domain) to that host:port, e.g. to the proxy under test.
#   (use a different PFX_ROOT/PFX_PORT for the second instance)
# * POLICY: PFX_POLICY_SERVICE='inet:127.0.0.1:10040' adds
#   "check_policy_service inet:127.0.0.1:10040" to smtpd_recipient_restrictions (a policy
#   server such as mppproxy --mode policy answers for each RCPT); unset: no policy service
# * FILTER MODES (docs/postfix.md): PFX_FILTER=before-queue or after-queue with
#   PFX_FILTER_ADDR=127.0.0.1:PORT (the proxy) and PFX_RETURN_PORT (a second smtpd on
#   127.0.0.1 that takes the filtered mail back and delivers it as in backend mode):
#   before-queue: the smtpd on PFX_PORT hands each session to the proxy in lockstep
#   (smtpd_proxy_filter, XFORWARD when the proxy announces it);
#   after-queue: mail is queued, then sent to the proxy by the "mppfilter" smtp
#   transport with XFORWARD (content_filter, smtp_send_xforward_command = yes).
# Needs root. Installs postfix, swaks, openssl and libnet-ssleay-perl (for swaks --tls)
# through apt-install.sh if they are missing (never runs `apt-get update` unless the
# install fails). Loopback only; nothing is ever sent out in backend mode.
# Idempotent: an already-running instance is reloaded with the new config.
#
# Usage: $0            start (or reload) and wait until the port answers
#        $0 stop       orderly stop; waits until master has exited
#        $0 abort      abrupt stop (running smtpd sessions are killed); waits too
#        $0 status     exit 0 if master is running, 1 if not
set -euo pipefail
PFX_ROOT=${PFX_ROOT:-/tmp/pfx-backend}
PFX_PORT=${PFX_PORT:-10025}
PFX_DOMAINS=${PFX_DOMAINS:-"example.com example.net"}
PFX_RELAYHOST=${PFX_RELAYHOST:-}
PFX_XHOSTS=${PFX_XHOSTS:-127.0.0.0/8}
PFX_POLICY_SERVICE=${PFX_POLICY_SERVICE:-}
PFX_FILTER=${PFX_FILTER:-}
PFX_FILTER_ADDR=${PFX_FILTER_ADDR:-}
PFX_RETURN_PORT=${PFX_RETURN_PORT:-}
PFX_NAME=${PFX_NAME:-$(basename "$PFX_ROOT")}
CFG=$PFX_ROOT/etc
TLS=$PFX_ROOT/tls
HERE=$(dirname "$(readlink -f "$0")")

PIDF=$PFX_ROOT/spool/pid/master.pid
master_pid() { [ -s "$PIDF" ] && tr -d ' \n' < "$PIDF"; }
# A pid file left by an instance that is gone may name a pid some other process has
# since been given: alive only if that process is a Postfix master.
master_alive() {
    local m; m=$(master_pid) && [ -n "$m" ] && kill -0 "$m" 2>/dev/null \
        && [ "$(cat "/proc/$m/comm" 2>/dev/null)" = master ]
}

# GOTCHA: without a tty the postfix command reports fatal errors ONLY to syslog
# (/dev/log, absent in containers) and exits 1 silently; `script` gives it a tty
# so the error reaches our stderr.
pfx() { script -qec "postfix -c $CFG $*" /dev/null; }

# `postfix stop` returns before master has exited: wait (bounded) for it, so that an
# immediate restart does not "reload" a dying master.
stop_master() {
    local how=$1 m i
    master_alive || return 0
    m=$(master_pid)
    pfx "$how" >/dev/null 2>&1 || kill -TERM "$m" 2>/dev/null || true
    for i in $(seq 1 100); do kill -0 "$m" 2>/dev/null || return 0; sleep 0.1; done
    echo "postfix master $m still running after 10 s; sending SIGKILL" >&2
    kill -KILL "$m" 2>/dev/null || true
    for i in $(seq 1 20); do kill -0 "$m" 2>/dev/null || return 0; sleep 0.1; done
    echo "postfix master $m did not exit" >&2
    return 1
}

case "${1:-start}" in
    stop)   stop_master stop; exit $? ;;
    abort)  stop_master abort; exit $? ;;
    status) master_alive; exit $? ;;
    start)  ;;
    *)      echo "usage: $0 [start|stop|abort|status]" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
    echo "$0: must run as root (postfix -c DIR start, chown of the maildirs)" >&2
    exit 1
fi

missing=()
command -v postfix >/dev/null || missing+=(postfix)
command -v swaks >/dev/null || missing+=(swaks)
command -v openssl >/dev/null || missing+=(openssl)
command -v script >/dev/null || missing+=(bsdutils)
perl -MNet::SSLeay -e1 2>/dev/null || missing+=(libnet-ssleay-perl)
if [ ${#missing[@]} -gt 0 ]; then
    "$HERE/apt-install.sh" "${missing[@]}"
fi

mkdir -p "$CFG" "$PFX_ROOT/spool" "$PFX_ROOT/data" "$PFX_ROOT/mail" "$TLS"
chown postfix "$PFX_ROOT/data"
# virtual(8) refuses to deliver as root: mail files are owned by nobody (readable by root).
chown nobody:nogroup "$PFX_ROOT/mail"
# Postfix refuses to use a queue dir whose parent is group/other-writable (e.g. /tmp itself
# is fine since it is sticky+root-owned; a 0777 non-sticky parent is not).
chmod 755 "$PFX_ROOT"

# Self-signed certificate for STARTTLS, made once. smtpd reads the key as root before it
# drops privileges, so the key stays 0600 root.
if [ ! -s "$TLS/cert.pem" ] || [ ! -s "$TLS/key.pem" ]; then
    chmod 700 "$TLS"
    openssl req -x509 -newkey rsa:2048 -sha256 -days 3650 -nodes \
        -keyout "$TLS/key.pem.tmp" -out "$TLS/cert.pem.tmp" \
        -subj "/CN=localhost" \
        -addext "subjectAltName=DNS:localhost,DNS:$PFX_NAME.localdomain,IP:127.0.0.1" \
        >/dev/null 2>&1
    chmod 600 "$TLS/key.pem.tmp"; chmod 644 "$TLS/cert.pem.tmp"
    mv -f "$TLS/key.pem.tmp" "$TLS/key.pem"; mv -f "$TLS/cert.pem.tmp" "$TLS/cert.pem"
fi
chmod 755 "$TLS"   # the cert is public; tests read it to verify the backend

NOBODY_UID=$(id -u nobody); NOGROUP_GID=$(getent group nogroup | cut -d: -f3)

# Catch-all recipient map: anything@domain -> Maildir "domain/" (trailing / = Maildir).
# GOTCHA: virtual(8) forbids $1 substitution from regexp maps, so per-user Maildirs need
# explicit entries; a per-domain catch-all is enough: each delivered copy carries a
# "Delivered-To: rcpt@domain" header telling which recipient it was for.
: > "$CFG/vmailbox"
for d in $PFX_DOMAINS; do echo "@$d    $d/" >> "$CFG/vmailbox"; done

cat > "$CFG/main.cf" <<CF
# generated by scripts/services/start-postfix-backend.sh
compatibility_level = 3.6
queue_directory = $PFX_ROOT/spool
data_directory = $PFX_ROOT/data
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
daemon_directory = /usr/lib/postfix/sbin
command_directory = /usr/sbin
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-$PFX_NAME
# log to a file instead of syslog (no rsyslog in containers)
maillog_file = $PFX_ROOT/maillog
maillog_file_prefixes = $PFX_ROOT
myhostname = $PFX_NAME.localdomain
mydomain = localdomain
myorigin = \$myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# offline: never use DNS (MX/A lookups, reverse lookups)
disable_dns_lookups = yes
smtp_dns_support_level = disabled
smtp_host_lookup = native
lmtp_host_lookup = native
smtpd_peername_lookup = no
smtpd_client_restrictions =
smtpd_helo_restrictions =
smtpd_sender_restrictions =
biff = no
alias_maps =
alias_database =
local_recipient_maps =
append_dot_mydomain = no
smtputf8_enable = yes
message_size_limit = 52428800
mailbox_size_limit = 0
virtual_mailbox_limit = 0
# deliver quickly and do not sit on failures for days in tests
queue_run_delay = 10s
minimal_backoff_time = 10s
maximal_backoff_time = 60s
maximal_queue_lifetime = 5m
bounce_queue_lifetime = 5m
smtp_connect_timeout = 5s
# the proxy may pass the real client on (XFORWARD, XCLIENT: Postfix XFORWARD_README,
# XCLIENT_README); only loopback may do so
smtpd_authorized_xforward_hosts = $PFX_XHOSTS
smtpd_authorized_xclient_hosts = $PFX_XHOSTS
# STARTTLS offered, not required, so the proxy's backend-STARTTLS can be tested;
# the Received: header then names the protocol and cipher
smtpd_tls_security_level = may
smtpd_tls_cert_file = $TLS/cert.pem
smtpd_tls_key_file = $TLS/key.pem
smtpd_tls_loglevel = 1
smtpd_tls_received_header = yes
CF

if [ -n "$PFX_RELAYHOST" ]; then
    cat >> "$CFG/main.cf" <<CF
# RELAY MODE: everything goes to $PFX_RELAYHOST as a normal SMTP client
relayhost = $PFX_RELAYHOST
relay_domains =
smtp_tls_security_level = none
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
CF
else
    cat >> "$CFG/main.cf" <<CF
# BACKEND MODE: accept the test domains, store each recipient in a Maildir
virtual_mailbox_domains = $PFX_DOMAINS
virtual_mailbox_base = $PFX_ROOT/mail
virtual_mailbox_maps = texthash:$CFG/vmailbox
virtual_minimum_uid = 1
virtual_uid_maps = static:$NOBODY_UID
virtual_gid_maps = static:$NOGROUP_GID
relayhost =
# other domains: "554 5.7.1 Relay access denied" at RCPT, even from 127.0.0.1
# (no permit_mynetworks: with 127.0.0.0/8 it would accept and relay any domain)
smtpd_relay_restrictions = reject_unauth_destination
# never try to send anything out (bounces to the sender are just dropped)
default_transport = error:test backend does not send mail out
relay_transport = error:test backend does not send mail out
CF
fi

if [ -n "$PFX_POLICY_SERVICE" ]; then
    cat >> "$CFG/main.cf" <<CF
# POLICY: every RCPT (after the relay check) is delegated to the policy server
# (SMTPD_POLICY_README); no permit_mynetworks, so loopback clients are asked about too
smtpd_recipient_restrictions = check_policy_service $PFX_POLICY_SERVICE
# fail fast in tests when the policy server is gone (default 100s)
smtpd_policy_service_timeout = 10s
CF
fi

case "$PFX_FILTER" in
    "") ;;
    before-queue|after-queue)
        if [ -z "$PFX_FILTER_ADDR" ] || [ -z "$PFX_RETURN_PORT" ]; then
            echo "PFX_FILTER=$PFX_FILTER needs PFX_FILTER_ADDR and PFX_RETURN_PORT" >&2; exit 2
        fi ;;
    *) echo "PFX_FILTER must be before-queue or after-queue, not $PFX_FILTER" >&2; exit 2 ;;
esac
if [ "$PFX_FILTER" = after-queue ]; then
    cat >> "$CFG/main.cf" <<CF
# AFTER-QUEUE FILTER: queued mail goes through the proxy, which relays it to the
# return smtpd on $PFX_RETURN_PORT (content_filter is switched off there)
content_filter = mppfilter:[${PFX_FILTER_ADDR%:*}]:${PFX_FILTER_ADDR##*:}
CF
fi

# master.cf without chroot (chroot would need /etc/services etc. copied into the queue dir)
SMTPD_OPTS=""
[ "$PFX_FILTER" = before-queue ] && SMTPD_OPTS="  -o smtpd_proxy_filter=$PFX_FILTER_ADDR
  -o smtpd_proxy_timeout=120s"
cat > "$CFG/master.cf" <<CF
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:$PFX_PORT inet n - n - - smtpd
$SMTPD_OPTS
CF
if [ -n "$PFX_FILTER" ]; then
    cat >> "$CFG/master.cf" <<CF
# the filtered mail comes back here: no filter again, no checks done twice
127.0.0.1:$PFX_RETURN_PORT inet n - n - - smtpd
  -o content_filter=
  -o smtpd_proxy_filter=
  -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters
  -o smtpd_client_restrictions=
  -o smtpd_helo_restrictions=
  -o smtpd_sender_restrictions=
  -o smtpd_recipient_restrictions=
  -o smtpd_relay_restrictions=permit_mynetworks,reject
  -o mynetworks=127.0.0.0/8
  -o smtpd_authorized_xforward_hosts=127.0.0.0/8
# the after-queue filter's transport: the proxy hears the real client (XFORWARD)
mppfilter unix - - n - 10 smtp
  -o smtp_send_xforward_command=yes
  -o disable_mime_output_conversion=yes
  -o smtp_tls_security_level=none
CF
fi
cat >> "$CFG/master.cf" <<CF
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
CF

# creates/fixes queue sub-directories and their ownership
[ -d "$PFX_ROOT/spool/maildrop" ] || pfx set-permissions >/dev/null 2>&1 || true
# (`postfix start` itself runs the fatal config checks; a full `postfix check` costs ~2 s)

# (`postfix status` is slow -- ~2.5 s when stopped -- so look at master.pid ourselves)
if master_alive; then
    pfx reload
else
    pfx start
fi

# wait (at most 15 s) until the SMTP port answers
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$PFX_PORT") 2>/dev/null; }
for i in $(seq 1 150); do port_open && break; sleep 0.1; done
if ! port_open; then
    echo "postfix did not open 127.0.0.1:$PFX_PORT" >&2
    tail -20 "$PFX_ROOT/maillog" >&2 || true
    exit 1
fi

echo "postfix ($PFX_NAME) listening on 127.0.0.1:$PFX_PORT; log: $PFX_ROOT/maillog"
if [ -n "$PFX_RELAYHOST" ]; then
    echo "  relays all mail to $PFX_RELAYHOST"
else
    echo "  mail for: $PFX_DOMAINS -> $PFX_ROOT/mail/<domain>/new/"
fi
[ -z "$PFX_POLICY_SERVICE" ] || echo "  recipients checked by check_policy_service $PFX_POLICY_SERVICE"
echo "  STARTTLS cert: $TLS/cert.pem; XFORWARD/XCLIENT from $PFX_XHOSTS"
echo "  queue:  postqueue -c $CFG -p     flush: postqueue -c $CFG -f"
echo "  stop:   $0 stop"
