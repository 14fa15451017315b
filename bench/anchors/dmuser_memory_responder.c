/*
 * The NBD scenario's hop-floor anchor: the cheapest possible daemon behind
 * dmuserd's nbdkit plugin.
 *
 *     dmuser_memory_responder SOCKET SIZE
 *
 * Listens on the Unix socket SOCKET for the plugin's dm-user channels and
 * answers them from a SIZE-byte RAM disk, in C, with nothing between the
 * socket and the disk: READ is one sendmsg of the answer header and the
 * disk's bytes, WRITE one receive straight into the disk, every other
 * request SUCCESS. No model, no checks, no counters. One thread waits on
 * every channel with epoll, as dmuserd's daemon does (a thread per
 * channel was measured: on a small machine its wake-ups cost nbdkit more
 * than they save, so it was no floor for small requests). A request is
 * served whole once its channel is readable: the plugin sends header and
 * payload in one go.
 * nbdkit + daemon/nbdkit_plugin.py in front of it is therefore the most any
 * daemon behind that plugin can deliver: the NBD scenario reports dmuserd
 * against it, and it against nbdkit's python plugin alone (the price of the
 * hop itself, the exact dm-user wire format on a Unix socket).
 *
 * Built by the scenario with `cc -O2`; stops on SIGTERM.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

enum { HEADER_SIZE = 40, SECTOR_SIZE = 512, READ = 0, WRITE = 1 };

struct header { uint64_t seq, type, flags, sector, len; }; /* little-endian u64s, as on x86 */

static unsigned char *disk;
static uint64_t disk_size;

static int receive_all(int fd, void *buf, size_t n)
{
	unsigned char *p = buf;
	while (n) {
		ssize_t got = recv(fd, p, n, MSG_WAITALL);
		if (got <= 0) {
			if (got < 0 && errno == EINTR)
				continue;
			return -1;
		}
		p += got;
		n -= (size_t)got;
	}
	return 0;
}

static int send_all(int fd, struct iovec *iov, int count)
{
	while (count) {
		struct msghdr msg = { .msg_iov = iov, .msg_iovlen = (size_t)count };
		ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
		if (sent < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		while (count && (size_t)sent >= iov->iov_len) {
			sent -= (ssize_t)iov->iov_len;
			iov++;
			count--;
		}
		if (count) {
			iov->iov_base = (char *)iov->iov_base + sent;
			iov->iov_len -= (size_t)sent;
		}
	}
	return 0;
}

/* Serve one request of channel fd; -1 when the channel is done. */
static int serve_request(int fd)
{
	struct header h;
	if (receive_all(fd, &h, HEADER_SIZE))
		return -1;
	uint64_t offset = h.sector * SECTOR_SIZE;
	int data = (h.type == READ || h.type == WRITE) && h.len;
	if (data && (offset > disk_size || h.len > disk_size - offset))
		return -1; /* the plugin never asks this: its sizes come from ours */
	if (h.type == WRITE && data && receive_all(fd, disk + offset, h.len))
		return -1;
	struct header answer = { h.seq, 0, 0, h.sector, h.len };
	struct iovec iov[2] = { { &answer, HEADER_SIZE }, { disk + offset, h.len } };
	return send_all(fd, iov, h.type == READ && data ? 2 : 1);
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s SOCKET SIZE\n", argv[0]);
		return 2;
	}
	disk_size = strtoull(argv[2], NULL, 0);
	disk = calloc(1, disk_size);
	int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	if (!disk || listener < 0 || strlen(argv[1]) >= sizeof addr.sun_path) {
		perror("dmuser_memory_responder: setup");
		return 1;
	}
	strcpy(addr.sun_path, argv[1]);
	unlink(argv[1]);
	if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 128)) {
		perror("dmuser_memory_responder: bind/listen");
		return 1;
	}
	int ep = epoll_create1(EPOLL_CLOEXEC);
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = listener };
	if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev)) {
		perror("dmuser_memory_responder: epoll");
		return 1;
	}
	for (;;) {
		struct epoll_event ready[64];
		int n = epoll_wait(ep, ready, 64, -1);
		if (n < 0 && errno != EINTR) {
			perror("dmuser_memory_responder: epoll_wait");
			return 1;
		}
		for (int i = 0; i < n; i++) {
			int fd = ready[i].data.fd;
			if (fd != listener) {
				if (serve_request(fd)) {
					epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
					close(fd);
				}
				continue;
			}
			int channel = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
			if (channel < 0)
				continue; /* EINTR, ECONNABORTED: the next wake-up tries again */
			int size = 4 << 20; /* as the daemon's channel buffers */
			setsockopt(channel, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
			struct epoll_event cev = { .events = EPOLLIN, .data.fd = channel };
			if (epoll_ctl(ep, EPOLL_CTL_ADD, channel, &cev))
				close(channel);
		}
	}
}
