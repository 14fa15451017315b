"""The trio runtime: targets, the dispatcher, the exports (FUSE, NBD,
dm-user), the control socket, the command line and systemd integration."""
