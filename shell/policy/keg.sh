# keg.sh: a small POSIX shell library over the keg command, for policy scripts (docs/policies.md).
#
#   . "$(dirname "$0")/keg.sh"
#
# Which keg: KEG_URL and KEG_TOKEN (or KEG_DIR), as for keg itself. The keg command is $KEG (default: keg).
# Functions return 0 on success, 124 when a wait timed out, 1 otherwise; they print results on stdout and
# nothing else there. Variables they use start with _k (POSIX sh has no local variables).

KEG=${KEG:-keg}
KEG_PROG=${KEG_PROG:-$(basename "$0")}

# keg_say MESSAGE...: one line on standard error, prefixed with the script's name.
keg_say() { printf '%s: %s\n' "$KEG_PROG" "$*" >&2; }

# keg_die MESSAGE...: say it and exit 1.
keg_die() { keg_say "$*"; exit 1; }

# The JSON helper (python3 is there wherever keg is). Subcommands, reading one JSON value on stdin:
#   get FIELD [DEFAULT]    print FIELD (dotted: env.PORT; "." the whole); a string as it is, anything else as
#                          JSON; missing: DEFAULT, or exit 1
#   set FIELD JSON ...     print the object with each FIELD set to the JSON value (objects made on the way)
#   del FIELD ...          print the object without each FIELD
_KEG_JSON_PY='
import json, sys
def walk(obj, field):
    for part in [p for p in field.split(".") if p]:
        obj = obj[part] if isinstance(obj, dict) else obj[int(part)]
    return obj
cmd, args, obj = sys.argv[1], sys.argv[2:], json.load(sys.stdin)
if cmd == "get":
    try:
        value = walk(obj, args[0])
    except (KeyError, IndexError, ValueError, TypeError):
        if len(args) < 2:
            sys.exit(1)
        value = args[1]
    print(value if isinstance(value, str) else json.dumps(value))
    sys.exit(0)
for i in range(0, len(args), 2 if cmd == "set" else 1):
    *parents, last = args[i].split(".")
    here = obj
    for part in parents:
        here = here.setdefault(part, {}) if cmd == "set" else here.get(part, {})
    if cmd == "set":
        here[last] = json.loads(args[i + 1])
    else:
        here.pop(last, None)
print(json.dumps(obj, indent=2, sort_keys=True))
'
keg_json() { python3 -c "$_KEG_JSON_PY" "$@"; }

# keg_head: the newest revision number.
keg_head() { "$KEG" log -n 1 | cut -f1; }

# keg_json_field PATH FIELD [DEFAULT]: a field of the JSON object at PATH.
keg_json_field() {
    _kf_body=$("$KEG" cat "$1") || return 1
    printf '%s\n' "$_kf_body" | keg_json get "$2" ${3+"$3"}
}

# keg_update_json PATH FIELD JSON [FIELD JSON...]: set fields of the JSON object at PATH by compare-and-swap,
# reading again and retrying when someone else wrote PATH in between. Prints the new KID.
keg_update_json() {
    _ku_path=$1
    shift
    _ku_try=0
    while [ "$_ku_try" -lt 20 ]; do
        _ku_try=$((_ku_try + 1))
        _ku_rev=$(keg_head) || return 1
        _ku_kid=$("$KEG" kid -r "$_ku_rev" "$_ku_path") || return 1
        _ku_body=$("$KEG" cat -r "$_ku_rev" "$_ku_path") || return 1
        _ku_new=$(printf '%s\n' "$_ku_body" | keg_json set "$@") || return 1
        _ku_out=$(printf '%s\n' "$_ku_new" | "$KEG" put --if-match "$_ku_kid" "$_ku_path" 2>&1)
        case $? in
            0) printf '%s\n' "$_ku_out" | cut -f2; return 0 ;;
            3) continue ;;                     # changed under us: read it again
            *) printf '%s\n' "$_ku_out" >&2; return 1 ;;
        esac
    done
    keg_say "$_ku_path keeps changing; gave up after $_ku_try tries"
    return 1
}

# keg_wait_change PREFIX [TIMEOUT] [SINCE]: wait for the first change under PREFIX after revision SINCE
# (default: now); print its line (revision, action, path, old KID, new KID). 124 after TIMEOUT seconds.
keg_wait_change() {
    _kw_since=${3:-}
    [ -n "$_kw_since" ] || _kw_since=$(keg_head) || return 1
    _kw_out=$("$KEG" watch "$1" --since "$_kw_since" --count 1 ${2:+--timeout "$2"}) || return 1
    [ -n "$_kw_out" ] || return 124
    printf '%s\n' "$_kw_out"
}

# keg_now: seconds since the epoch.
keg_now() { date +%s; }

# keg_job_service JOB: the service a job publishes its replicas under (its "service", else its name).
keg_job_service() { keg_json_field "/jobs/$1.json" service "$1"; }

# keg_service_table SERVICE [REV]: /services/SERVICE.tsv (nothing when there is none).
keg_service_table() {
    "$KEG" cat ${2:+-r "$2"} "/services/$1.tsv" 2>/dev/null || true
}

# keg_tsv_rows COLUMN=VALUE...: the rows of the table on stdin (header by name) where every COLUMN has VALUE.
keg_tsv_rows() {
    awk -F '\t' -v want="$*" '
        NR == 1 && /^#/ { sub(/^# */, ""); for (i = 1; i <= NF; i++) col[$i] = i; next }
        /^#/ || NF == 0 { next }
        {
            n = split(want, pairs, " ")
            for (i = 1; i <= n; i++) {
                eq = index(pairs[i], "="); name = substr(pairs[i], 1, eq - 1)
                if (!(name in col) || $(col[name]) != substr(pairs[i], eq + 1)) next
            }
            print
        }'
}

# keg_healthy_count JOB [REV]: how many replicas of JOB are healthy: the healthy lines of its service table
# for a job with "port": true (what the router uses), else its replicas running with a passing or no check.
keg_healthy_count() {
    _kc_body=$("$KEG" cat ${2:+-r "$2"} "/jobs/$1.json" 2>/dev/null) || { echo 0; return 0; }
    if [ "$(printf '%s\n' "$_kc_body" | keg_json get port false)" = true ]; then
        keg_service_table "$(printf '%s\n' "$_kc_body" | keg_json get service "$1")" "${2:-}" |
            keg_tsv_rows job="$1" health=healthy | wc -l | tr -d ' '
    else
        keg_replicas "$1" | awk -F '\t' '$3 == "running" && ($4 == "healthy" || $4 == "-")' | wc -l | tr -d ' '
    fi
}

# keg_wait_healthy JOB N [TIMEOUT]: wait until at least N replicas of JOB are healthy (as keg_healthy_count
# counts them); default timeout 120 s, 124 when it passes. Follows the namespace through the watch stream.
keg_wait_healthy() {
    _kh_deadline=$(($(keg_now) + ${3:-120}))
    while :; do
        _kh_rev=$(keg_head) || return 1
        _kh_count=$(keg_healthy_count "$1" "$_kh_rev") || return 1
        [ "$_kh_count" -ge "$2" ] && return 0
        _kh_left=$((_kh_deadline - $(keg_now)))
        [ "$_kh_left" -gt 0 ] || return 124
        [ "$_kh_left" -le 5 ] || _kh_left=5   # status changes come from every machine: look again now and then
        keg_wait_change / "$_kh_left" "$_kh_rev" >/dev/null
        case $? in 0|124) ;; *) return 1 ;; esac
    done
}

# keg_replicas JOB: one line per replica the scheduler has placed for JOB (from /scheduler/jobs/JOB.json),
# tab-separated: name, machine, state, health, endpoint (state "unreported" before its Mayor reported on it;
# health and endpoint "-" when there are none).
_KEG_REPLICAS_PY='
import json, sys
report = json.loads(sys.argv[1])
status = {(s.get("machine"), s.get("name")): s for s in json.load(sys.stdin)}
for name, machine in sorted((report.get("replicas") or {}).items()):
    s = status.get((machine, name)) or {}
    print("\t".join([name, machine, s.get("state") or "unreported", s.get("health") or "-", s.get("endpoint") or "-"]))
'
keg_replicas() {
    _kr_report=$("$KEG" cat "/scheduler/jobs/$1.json" 2>/dev/null) || return 0
    _kr_ps=$("$KEG" ps --all --json) || return 1
    printf '%s\n' "$_kr_ps" | python3 -c "$_KEG_REPLICAS_PY" "$_kr_report"
}

# keg_wants_help "$@": true when the arguments ask for help (-h or --help before any --).
keg_wants_help() {
    for _ka in "$@"; do
        case $_ka in -h|--help) return 0 ;; --) return 1 ;; esac
    done
    return 1
}
