#!/usr/bin/env bash
# Stops the processes the demo started, one PID file at a time: the traffic
# generator, the agents, the operator and the model server. Each is stopped on its
# own, so one that has already exited (the traffic ends by itself after 15 minutes)
# does not keep the others running. A PID file whose process is gone, or whose PID
# now belongs to a process the demo did not start, is removed without a signal.
# Prints what it stopped. Usage: examples/demo-stop.sh [DEMO_DIR] (default target/demo).
set -uo pipefail
demo=${1:-target/demo}

# The demo's processes, by PID-file name, and a word their command line holds.
expected_command() { # pid-file-name
  case $1 in
    traffic.pid) echo traffic.py ;;
    model-server.pid) echo http.server ;;
    operator.pid) echo shoal-operator ;;
    agent-*.pid) echo shoal-agent ;;
    *) echo "" ;;
  esac
}

# Running, and not a zombie waiting for its parent to collect it.
alive() { # pid
  kill -0 "$1" 2>/dev/null && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]
}

stop_one() { # pid-file
  local file=$1 name pid word
  name=$(basename "$file" .pid)
  pid=$(tr -dc '0-9' <"$file")
  rm -f "$file"
  word=$(expected_command "$(basename "$file")")
  if [[ -z $pid ]] || ! alive "$pid"; then
    echo "  $name: had already exited"
    return
  fi
  if [[ -z $word ]] || ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$word"; then
    echo "  $name: PID $pid is no longer the demo's $name; left alone"
    return
  fi
  kill "$pid" 2>/dev/null
  for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
  if alive "$pid"; then
    kill -KILL "$pid" 2>/dev/null
    echo "  $name: stopped (PID $pid, killed after 5 s)"
  else
    echo "  $name: stopped (PID $pid)"
  fi
}

shopt -s nullglob
files=("$demo/traffic.pid" "$demo"/agent-*.pid "$demo/operator.pid" "$demo/model-server.pid")
found=0
for file in "${files[@]}"; do
  [[ -f $file ]] || continue
  found=1
  stop_one "$file"
done
((found)) || echo "  no demo processes recorded in $demo"
exit 0
