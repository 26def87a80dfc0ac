#!/bin/bash
# The host check hack/vm-check.sh runs inside its VM (systemd as PID 1, cgroup v2), from the 9p
# share at /mnt/share: installs the project's Debian package with apt, starts the agent with
# systemctl as an operator does, and checks, per configuration named in /mnt/share/configs:
# limits in the v2 files, swap, OOMKilled (also when the event is lost), maxMemory rotation,
# crash replacement, adoption across an agent restart, cpuset pinning, the gateway, and (once)
# a host without /etc/hosts, loud refusals, a runc-less allowlist, the gateway's socket kept by
# systemd across restarts and its keys file from LoadCredential. Each result is a line
# CONFIG|CHECK|ok or MISS|DETAIL in /mnt/share/results.
set -uo pipefail
SHARE=/mnt/share
RESULTS=$SHARE/results
NS=ollama-fleet
: >"$RESULTS"
export ETCDCTL_API=3
log() { echo "[guest $(date +%T)] $*"; }
record() { # record CONFIG CHECK ok|MISS DETAIL
  echo "$1|$2|$3|$4" >>"$RESULTS"
  log "$1 $2: $3 ($4)"
}
check() { # check CONFIG CHECK DETAIL CONDITION...: ok when the condition holds
  local config=$1 name=$2 detail=$3; shift 3
  if "$@"; then record "$config" "$name" ok "$detail"; else record "$config" "$name" MISS "$detail"; fi
}
wait_for() { # wait_for SECONDS COMMAND...: polls every second until it succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 1
  done
}
instances() { ollama-fleet get instances "$1" -o json 2>/dev/null | jq -c '.items[]'; }
ready_count() { ollama-fleet get instances "$1" -o json 2>/dev/null | jq '[.items[] | select(.ready)] | length'; }
has_ready() { [[ $(ready_count "$1") -ge $2 ]]; }
field() { ollama-fleet get instances "$1" -o json 2>/dev/null | jq -r "[.items[] | select(.slot == $2)][0] | $3"; }
pid_of() { ctr -n $NS task ls 2>/dev/null | awk -v id="$1" '$1 == id && $3 == "RUNNING" {print $2}'; }
cgroup_of() { echo "/sys/fs/cgroup$(sed -n 's/^0:://p' "/proc/$1/cgroup")"; }
agent_ready() { curl -fsS http://127.0.0.1:9477/readyz; }

# One fleet of the sim image; extra YAML lines after the spec's common part.
apply() { # apply NAME PORT RUNTIME_BINARY EXTRA
  local binary=""
  [[ -n $3 ]] && binary="  runtime: {binaryName: $3}"
  cat >"/tmp/$1.yaml" <<YAML
apiVersion: ollama-fleet.io/v1alpha1
kind: OllamaFleet
metadata: {name: $1}
spec:
  model: $1:latest
  image: localhost/ollama-sim:dev
  imagePullPolicy: Never
  network: {hostIP: 127.0.0.1, basePort: $2}
  models: {hostPath: /var/lib/ollama-fleet/models/$1}
  probes:
    readiness: {periodSeconds: 1, timeoutSeconds: 2}
    liveness: {periodSeconds: 2, timeoutSeconds: 2}
    startupTimeoutSeconds: 120
  restartBackoff: {initial: 1s, max: 10s}
  terminationGracePeriod: 5s
$binary
$4
YAML
  ollama-fleet apply -f "/tmp/$1.yaml"
}

# Swap on, so that "no swap" means something (a file made here: one from mkfs -d has holes).
if ! swapon --show | grep -q .; then
  dd if=/dev/zero of=/swapfile bs=1M count=512 status=none && chmod 600 /swapfile &&
    mkswap /swapfile >/dev/null && swapon /swapfile
fi
log "kernel $(uname -r), $(stat -fc %T /sys/fs/cgroup) at /sys/fs/cgroup, init $(cat /proc/1/comm), $(nproc) cpus"
record host cgroup2 "$([[ $(stat -fc %T /sys/fs/cgroup) == cgroup2fs ]] && echo ok || echo MISS)" "$(stat -fc %T /sys/fs/cgroup); systemd $(systemctl --version | head -n1 | cut -d' ' -f2); $(containerd --version | cut -d' ' -f3); runc $(runc --version | head -n1 | cut -d' ' -f3); crun $(crun --version | head -n1 | cut -d' ' -f3); etcd $(etcd --version | head -n1 | awk '{print $NF}'); swap $(swapon --show=SIZE --noheadings | head -n1)"

# Installed as an operator does: apt, the env file, systemctl.
if apt-get install -y -q "$SHARE"/ollama-fleet_*.deb >/tmp/apt.log 2>&1; then
  record host "apt install" ok "$(dpkg-query -W -f='${Package} ${Version}' ollama-fleet)"
else
  record host "apt install" MISS "$(tail -n3 /tmp/apt.log | tr '\n' ' ')"
  exit 1
fi
cat >>/etc/default/ollama-fleet <<ENV
OLLAMA_FLEET_SERVE=127.0.0.1:11400
OLLAMA_FLEET_ALLOW_RUNTIMES=runc,crun=/usr/bin/crun
OLLAMA_FLEET_RESERVED_MEMORY=256Mi
OLLAMA_FLEET_DEFAULT_MEMORY=256Mi
ENV
wait_for 60 etcdctl endpoint health || { record host etcd MISS "Debian's etcd did not answer"; exit 1; }
ctr -n $NS images import "$SHARE/ollama-sim.oci.tar" >/dev/null
systemctl enable --now ollama-fleet-agent >/dev/null 2>&1
check host "systemctl enable --now" "agent ready on :9477" wait_for 60 agent_ready

# Said loudly: a runc-less allowlist at startup, a refusal once per reason.
out=$(timeout 5 ollama-fleet agent --manifests /nonexistent-empty --namespace vmcheck-allow \
  --listen 127.0.0.1:9479 --allow-runtime crun=/usr/bin/crun 2>&1 | grep -c "does not list runc")
check host "runc-less allowlist said" "warning at start ($out)" test "$out" -ge 1

one_config() {
  local config=$1 binary="" p port=21000 since
  case $config in
    runc) p=rc ;;
    crun) p=cr; binary=crun ;;
    systemd-cgroup)
      p=sd
      mkdir -p /etc/containerd
      cat >/etc/containerd/config.toml <<'TOML'
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = true
TOML
      systemctl restart containerd
      wait_for 30 ctr version
      check "$config" "containerd config" "SystemdCgroup = true in /etc/containerd/config.toml" \
        grep -q "SystemdCgroup = true" /etc/containerd/config.toml ;;
  esac
  since=$(date '+%Y-%m-%d %H:%M:%S')

  apply "$p-limits" $port "$binary" "  replicas: {perSocket: 1}
  resources: {cpus: 0.5, memory: 128Mi, pids: 256, cpuPinning: socket}
  env: {SIM_MODEL_SIZE: 16Mi}" >/dev/null
  apply "$p-swap" $((port + 10)) "$binary" "  replicas: {perNode: 1}
  resources: {memory: 128Mi, swap: 32Mi}
  env: {SIM_MODEL_SIZE: 16Mi}" >/dev/null
  apply "$p-oom" $((port + 20)) "$binary" "  replicas: {perNode: 1}
  resources: {memory: 64Mi}
  env: {SIM_MODEL_SIZE: 16Mi, SIM_LEAK_RATE: 16Mi}" >/dev/null
  apply "$p-rotate" $((port + 30)) "$binary" "  replicas: {perNode: 1}
  resources: {memory: 256Mi}
  env: {SIM_MODEL_SIZE: 16Mi, SIM_LEAK_RATE: 8Mi}
  rotation: {maxMemory: 64Mi}" >/dev/null
  if ! wait_for 240 has_ready "$p-limits" 2; then
    record "$config" converge MISS "$p-limits: $(ready_count "$p-limits") of 2 ready in 240 s"
    return
  fi
  record "$config" converge ok "$p-limits 2 of 2 ready"

  # Limits in the v2 files, cpuset pinning per socket, oom_score_adj, the runtime used.
  local id0 id1 pid0 pid1 cg0 cg1
  id0=$(field "$p-limits" 0 .id) id1=$(field "$p-limits" 1 .id)
  pid0=$(pid_of "$id0") pid1=$(pid_of "$id1")
  cg0=$(cgroup_of "$pid0") cg1=$(cgroup_of "$pid1")
  local got="memory.max $(cat "$cg0/memory.max"), cpu.max $(cat "$cg0/cpu.max"), pids.max $(cat "$cg0/pids.max")"
  check "$config" "limits (v2 files)" "$got" test "$got" = "memory.max 134217728, cpu.max 50000 100000, pids.max 256"
  check "$config" "no swap" "memory.swap.max $(cat "$cg0/memory.swap.max")" test "$(cat "$cg0/memory.swap.max")" = 0
  got="slot 0: $(cat "$cg0/cpuset.cpus.effective"), slot 1: $(cat "$cg1/cpuset.cpus.effective"); subtree of $(dirname "$cg0"): $(cat "$(dirname "$cg0")/cgroup.subtree_control")"
  check "$config" "cpuset pinning" "$got" test "$(cat "$cg0/cpuset.cpus.effective")/$(cat "$cg1/cpuset.cpus.effective")" = "0/1"
  check "$config" "oom_score_adj" "$(cat "/proc/$pid0/oom_score_adj")" test "$(cat "/proc/$pid0/oom_score_adj")" = 900
  # Which OCI runtime made it: the binary in the shim's options, and the state each leaves in
  # the shim's root (runc: state.json, crun: status).
  local rt state
  rt=$(ctr -n $NS containers info "$id0" | jq -r '.Runtime.Options.value // empty' | base64 -d 2>/dev/null | tr -c '[:print:]' ' ' | grep -o '[^ ]*crun[^ ]*' || echo default)
  state=$(ls "/run/containerd/runc/$NS/$id0" 2>/dev/null | tr '\n' ' ')
  local made_by=runc
  [[ $state == *status* && $state != *state.json* ]] && made_by=crun
  check "$config" "runtime" "shim options: $rt; state: $state-> $made_by; cgroup ${cg0#/sys/fs/cgroup}" test "$made_by" = "${binary:-runc}"

  # Swap: a bounded amount when asked.
  if wait_for 120 has_ready "$p-swap" 1; then
    local cgs
    cgs=$(cgroup_of "$(pid_of "$(field "$p-swap" 0 .id)")")
    check "$config" "bounded swap" "swap: 32Mi -> memory.swap.max $(cat "$cgs/memory.swap.max")" test "$(cat "$cgs/memory.swap.max")" = 33554432
  else
    record "$config" "bounded swap" MISS "$p-swap not ready"
  fi

  # OOM: the event, then an OOM while the agent is stopped (the event is lost).
  oom_seen() { [[ $(field "$p-oom" 0 .lastExit.reason) == OOMKilled ]]; }
  check "$config" "OOMKilled" "lastExit $(wait_for 120 oom_seen; field "$p-oom" 0 '.lastExit | "\(.code) \(.reason)"'), restarts $(field "$p-oom" 0 .restarts)" oom_seen
  local restarts stopped_id lost
  oom_running() { ctr -n $NS task ls | awk -v p="$p-oom-" 'index($1, p) == 1 && $3 == "RUNNING" {print $1}' | head -n1; }
  has_oom_running() { [[ -n $(oom_running) ]]; }
  wait_for 60 has_oom_running
  stopped_id=$(oom_running)
  systemctl stop ollama-fleet-agent
  task_stopped() { ctr -n $NS task ls | awk -v id="$stopped_id" '$1 == id {print $3}' | grep -q STOPPED; }
  lost="$stopped_id not stopped while the agent was away"
  if wait_for 60 task_stopped; then
    lost="$stopped_id killed while the agent was stopped (memory.events: $(grep oom_kill "/sys/fs/cgroup/ollama-fleet/$NS/$stopped_id/memory.events" 2>/dev/null))"
  fi
  systemctl start ollama-fleet-agent
  wait_for 60 agent_ready
  told() { journalctl -u ollama-fleet-agent --since "$since" | grep "event was missed" | grep -q "$stopped_id"; }
  check "$config" "OOMKilled, event lost" "$lost -> $(wait_for 60 told && echo 'agent: OOM-killed, from the cgroup' || echo 'agent: not told')" told

  # maxMemory rotation before the OOM killer: leaks 8Mi/s, rotated past 64Mi of 256Mi.
  rotated() { curl -fsS http://127.0.0.1:9477/metrics | grep "^ollama_fleet_rotations_total{fleet=\"$p-rotate\",reason=\"MaxMemory\"}" | awk '{exit !($2 >= 1)}'; }
  check "$config" "maxMemory rotation" "$(wait_for 180 rotated; curl -fsS http://127.0.0.1:9477/metrics | grep "^ollama_fleet_rotations_total{fleet=\"$p-rotate\"" | tr '\n' ' ')" rotated

  # A crash (kill -9) is replaced.
  restarts=$(field "$p-limits" 0 .restarts)
  kill -9 "$(pid_of "$id0")"
  back() { [[ $(field "$p-limits" 0 .restarts) -gt $restarts ]] && [[ $(field "$p-limits" 0 .ready) == true ]]; }
  check "$config" "crash replaced" "kill -9 slot 0 -> restarts $(wait_for 120 back; field "$p-limits" 0 .restarts), ready $(field "$p-limits" 0 .ready)" back

  # Adoption: the agent restarts (with runc: by a package upgrade, whose postinst restarts a
  # running agent), the instances stay.
  local before after how agent_pid
  before=$(instances "$p-limits" | jq -r '"\(.id):\(.restarts)"' | sort | tr '\n' ' ')
  agent_pid=$(systemctl show -p MainPID --value ollama-fleet-agent)
  if [[ $config == runc ]]; then
    how="apt install --reinstall"
    apt-get install -y -q --reinstall "$SHARE"/ollama-fleet_*.deb >/tmp/apt-reinstall.log 2>&1
  else
    how="systemctl restart"
    systemctl restart ollama-fleet-agent
  fi
  wait_for 60 agent_ready
  how="$how: agent pid $agent_pid -> $(systemctl show -p MainPID --value ollama-fleet-agent)"
  wait_for 60 has_ready "$p-limits" 2
  after=$(instances "$p-limits" | jq -r '"\(.id):\(.restarts)"' | sort | tr '\n' ' ')
  check "$config" "adoption" "$how; before [$before] after [$after]" \
    test "$before" = "$after" -a "$agent_pid" != "$(systemctl show -p MainPID --value ollama-fleet-agent)"

  # The gateway answers for the fleet's model.
  local answer
  answer=$(curl -sS -m 30 http://127.0.0.1:11400/api/generate -d "{\"model\":\"$p-limits\",\"prompt\":\"hello\",\"stream\":false}")
  check "$config" "gateway" "$(echo "$answer" | jq -c '{model, done, eval_count}' 2>/dev/null || echo "$answer" | head -c 200)" \
    test "$(echo "$answer" | jq -r .done 2>/dev/null)" = true

  if [[ $config == runc ]]; then
    # A host without /etc/hosts: instances start without it, and the agent says so.
    mv /etc/hosts /etc/hosts.vmcheck
    apply "$p-nohosts" $((port + 40)) "$binary" "  replicas: {perNode: 1}" >/dev/null
    check "$config" "no /etc/hosts on the host" "instance ready: $(wait_for 120 has_ready "$p-nohosts" 1 && echo yes || echo no); $(journalctl -u ollama-fleet-agent --since "$since" | grep -c 'has no /etc/hosts') warning(s)" has_ready "$p-nohosts" 1
    mv /etc/hosts.vmcheck /etc/hosts
    ollama-fleet delete fleet "$p-nohosts" >/dev/null

    # A refused fleet is said at warn level, once per reason, however many passes.
    apply "$p-refused" $((port + 50)) kata-nope "  replicas: {perNode: 1}" >/dev/null
    sleep 10  # passes go on meanwhile (the rotating fleet)
    local said
    said=$(journalctl -u ollama-fleet-agent --since "$since" | grep -c "fleet not admitted.*$p-refused\|$p-refused.*fleet not admitted")
    check "$config" "refusal said once" "$said warning(s): $(journalctl -u ollama-fleet-agent --since "$since" | grep "$p-refused" | grep -o 'WARN.*' | head -n1 | cut -c1-160)" test "$said" = 1
    ollama-fleet delete fleet "$p-refused" >/dev/null
  fi

  for f in limits swap oom rotate; do ollama-fleet delete fleet "$p-$f" >/dev/null; done
  none_left() { [[ -z $(ctr -n $NS containers ls -q) ]]; }
  wait_for 120 none_left || record "$config" cleanup MISS "containers left: $(ctr -n $NS containers ls -q | tr '\n' ' ')"
}

for config in $(cat "$SHARE/configs"); do
  log "configuration $config"
  one_config "$config"
done
# The gateway's socket kept by systemd (ollama-fleet-agent.socket) across restarts: new
# connections through two `systemctl restart`s, with the agent binding --serve, then with the
# socket unit.
knock_through_restarts() { # prints: answered refused
  local out=/tmp/knocks.$1
  : >"$out"
  (
    end=$((SECONDS + 12))
    while ((SECONDS < end)); do
      curl -s -o /dev/null -w '%{http_code}\n' -m 30 http://127.0.0.1:11400/api/tags >>"$out"
      sleep 0.02
    done
  ) &
  local knocker=$!
  sleep 2
  systemctl restart ollama-fleet-agent
  sleep 3
  systemctl restart ollama-fleet-agent
  wait "$knocker"
  echo "$(grep -c '^200$' "$out") $(grep -vc '^200$' "$out")"
}
wait_for 60 agent_ready
read -r bound_ok bound_refused < <(knock_through_restarts bound)
since=$(date '+%Y-%m-%d %H:%M:%S')
systemctl stop ollama-fleet-agent
systemctl enable --now ollama-fleet-agent.socket >/dev/null 2>&1
systemctl start ollama-fleet-agent
wait_for 60 agent_ready
read -r kept_ok kept_refused < <(knock_through_restarts kept)
passed=$(journalctl -u ollama-fleet-agent --since "$since" | grep -c "serves on the socket systemd passed")
check host "socket kept across restarts" "two restarts: --serve bound by the agent: $bound_refused of $((bound_ok + bound_refused)) connections refused; ollama-fleet-agent.socket: $kept_refused of $((kept_ok + kept_refused)); $passed start(s) on systemd's socket" \
  test "$kept_refused" = 0 -a "$passed" -ge 3 -a "$kept_ok" -ge 20
systemctl disable --now ollama-fleet-agent.socket >/dev/null 2>&1

# The gateway's keys file handed over by systemd's LoadCredential (a drop-in, as README
# "Tenants" shows): a request with the key is served, one without is refused.
mkdir -p /etc/ollama-fleet /etc/systemd/system/ollama-fleet-agent.service.d
printf 'tenants:\n  ops: {}\nkeys:\n  - {name: vm, tenant: ops, token: vm-check-0123456789abcdef}\n' >/etc/ollama-fleet/keys.yaml
chmod 600 /etc/ollama-fleet/keys.yaml
cat >/etc/systemd/system/ollama-fleet-agent.service.d/keys.conf <<'UNIT'
[Service]
LoadCredential=keys:/etc/ollama-fleet/keys.yaml
Environment=OLLAMA_FLEET_SERVE_TOKEN_FILE=%d/keys
UNIT
systemctl daemon-reload
systemctl restart ollama-fleet-agent
wait_for 60 agent_ready
tags() { curl -s -o /dev/null -w '%{http_code}' -m 30 "$@" http://127.0.0.1:11400/api/tags; }
with_key=$(tags -H 'Authorization: Bearer vm-check-0123456789abcdef')
without_key=$(tags)
check host "keys from LoadCredential" "/api/tags with the key: $with_key, without: $without_key; $(journalctl -u ollama-fleet-agent -n 200 | grep -c 'keys file has mistakes') start error(s)" \
  test "$with_key" = 200 -a "$without_key" = 401
rm -r /etc/systemd/system/ollama-fleet-agent.service.d
systemctl daemon-reload

journalctl -u ollama-fleet-agent --no-pager >"$SHARE/agent.log" 2>&1
! grep -q '|MISS|' "$RESULTS"
