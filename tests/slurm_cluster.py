"""A private Slurm cluster on this machine: Debian's slurm-wlm and munge, run as root in the foreground.

One slurmctld and one slurmd per node name that resolves to this machine (its short hostname and `localhost`,
several slurmd on one host), each on its own port; munge's key and socket, Slurm's state, spool and logs all
live in one folder. `sbatch`, `srun`, `squeue`, `scontrol` and `scancel` reach it through `SLURM_CONF`.
"""

import os
import shutil
import socket
import subprocess
import time

MUNGED, SLURMCTLD, SLURMD = "/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd"


def missing() -> str | None:
    """Why no cluster can start here (None: it can)."""
    if os.geteuid() != 0:
        return "the Slurm tests start slurmctld, slurmd and munged as root"
    absent = [path for path in (MUNGED, SLURMCTLD, SLURMD) if not os.path.exists(path)]
    if absent or shutil.which("sbatch") is None:
        return f"Slurm is not installed ({', '.join(absent) or 'sbatch'}): apt-get install slurm-wlm munge"
    return None


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def local_node_names() -> list[str]:
    """Names that reach this machine, so torchrun's MASTER_ADDR (the job's first node name) resolves."""
    names = []
    for name in (socket.gethostname().split(".")[0], "localhost"):
        try:
            if socket.gethostbyname(name).startswith("127.") and name not in names:
                names.append(name)
        except OSError:
            continue
    return names


class Cluster:
    def __init__(self, folder: str):
        self.folder = folder
        self.nodes = local_node_names()
        self.processes: list[subprocess.Popen] = []
        self.conf = os.path.join(folder, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}

    def start(self, timeout: float = 60.0) -> "Cluster":
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> "Cluster":
        f = self.folder
        for sub in ("munge", "state", "spool", "log"):
            os.makedirs(os.path.join(f, sub), mode=0o700, exist_ok=True)
        key = os.path.join(f, "munge", "munge.key")
        with open(key, "wb") as out:
            out.write(os.urandom(128))
        os.chmod(key, 0o600)
        socket_path = os.path.join(f, "munge", "socket")
        self._daemon([MUNGED, "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
                      f"--pid-file={f}/munge/pid", f"--log-file={f}/munge/log", f"--seed-file={f}/munge/seed"])
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={os.cpu_count()}"
                          for name, port in zip(self.nodes, node_ports))
        with open(self.conf, "w") as out:
            out.write(f"""ClusterName=test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool/%n
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd-%n.pid
SlurmctldLogFile={f}/log/slurmctld.log
SlurmdLogFile={f}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
MpiDefault=none
ReturnToService=2
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self._wait_for(["munge", "-n", f"--socket={socket_path}"], timeout)
        self._daemon([SLURMCTLD, "-D", "-c", "-f", self.conf])
        for name in self.nodes:
            self._daemon([SLURMD, "-D", "-N", name, "-f", self.conf])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            idle = self.run("sinfo", "--Node", "--noheader", "--states=idle", "--format=%N", check=False).stdout.split()
            if sorted(idle) == sorted(self.nodes):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm nodes did not come up in {timeout:.0f} s; logs in {f}/log")

    def _daemon(self, command: list[str]) -> None:
        log = open(os.path.join(self.folder, "log", os.path.basename(command[0]) + ".out"), "a")
        self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _wait_for(self, command: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while subprocess.run(command, capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} did not answer in {timeout:.0f} s; logs in {self.folder}")
            time.sleep(0.2)

    def run(self, *command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(command, env={**self.env, **kwargs.pop("env", {})}, check=check, capture_output=True,
                              text=True, **kwargs)

    def stop(self) -> None:
        for process in reversed(self.processes):  # slurmd, slurmctld, then munged
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
