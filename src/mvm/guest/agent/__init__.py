"""The guest agent: serves the host over the virtio-serial port ``org.mvm.agent``.

/init starts it as uid 990 (never root) and restarts it if it dies. The message set is the
docstring of mvm/core/protocol.py. Many requests share the one channel by id, so nothing
long runs on the reading loop: every exec gets a thread that pumps its output and reports its
exit, file reads stream from a thread, and all writes to the port go through one lock.

When the host goes away the port reads EOF; everything tied to that connection (running
execs, half-written files) is dropped and the port is reopened for the next host.
Under Firecracker there is no virtio-serial: the agent listens on vsock port 1024
(``--vsock``) and serves one host connection at a time the same way.
Stdlib only: this runs on the guest's python3-minimal + libpython3.11-stdlib.
"""

# One module per concern: serve (the frame loop on each kind of channel), session (one host
# connection and its dispatch), channel (frames out), dispatch (argument checks and the
# handler registry), process (exec, console, pty), files, tunnels (port forwards) and system
# (telemetry, shutdown). Each registers its own handlers; session imports them all.
