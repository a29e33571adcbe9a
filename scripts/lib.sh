# Helpers the benchmark scripts share; `source "$here/lib.sh"`.

# A free TCP port on 127.0.0.1 (a random high one when python3 is missing).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null ||
    echo $((20000 + RANDOM % 20000))
}

# Wait up to 15 s for something to listen on 127.0.0.1:PORT; else print LOG
# (when given) and exit 1.
wait_port() { # port [log]
  for _ in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "${0##*/}: nothing listens on port $1" >&2
  if [ -n "${2:-}" ]; then cat "$2" >&2; fi
  exit 1
}

# The start of an awk program over result lines (`name k=v k=v …`): it
# collects every value by (name, key) and keeps the names in order of first
# appearance (`order[1..nn]`); `median(name, key)` is the median of a key's
# values. Append an END block: awk "$MEDIANS_AWK"' END { … }' FILE
MEDIANS_AWK='
  { name=$1; for (i=2;i<=NF;i++) { split($i,kv,"="); vals[name, kv[1], ++cnt[name, kv[1]]] = kv[2] }
    if (!(name in names)) order[++nn] = name; names[name]=1 }
  function median(name, key,   n, i, j, t, a) {
    n = cnt[name, key]; for (i=1;i<=n;i++) a[i] = vals[name, key, i]
    for (i=1;i<=n;i++) for (j=i+1;j<=n;j++) if (a[j]+0 < a[i]+0) { t=a[i]; a[i]=a[j]; a[j]=t }
    return (n % 2) ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2
  }'
