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
