// What zero-copy send buys a bulk sender: the sender's CPU per GB and throughput with plain
// send(2) and with MSG_ZEROCOPY (the kernel path IORING_OP_SEND_ZC uses too). run.sh drives it
// over a veth pair between two network namespaces, as the netns benchmark's hops are.
//
//   zc recv PORT                          read and discard every connection, forever
//   zc send IP PORT MIB CHUNK ZEROCOPY    send MIB MiB in CHUNK-byte writes; ZEROCOPY 0 or 1
//
// With zero copy a buffer may be written again only once the kernel has released it: the
// sender cycles through 8 buffers and waits for completion notices (the socket's error queue)
// before reusing one. A notice flagged "copied" means the kernel copied the pages after all.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/errqueue.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#ifndef SO_EE_ORIGIN_ZEROCOPY
#define SO_EE_ORIGIN_ZEROCOPY 5
#endif
#ifndef SO_EE_CODE_ZEROCOPY_COPIED
#define SO_EE_CODE_ZEROCOPY_COPIED 1
#endif
static double cpu(void) { struct rusage r; getrusage(RUSAGE_SELF, &r);
  return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6; }
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static long done_hi = -1, copied = 0, notes = 0;
static int reap(int fd, int block) {
  char ctl[256]; struct msghdr m = {0}; m.msg_control = ctl; m.msg_controllen = sizeof ctl;
  if (block) { struct pollfd p = {fd, 0, 0}; poll(&p, 1, 5000); }
  int n = recvmsg(fd, &m, MSG_ERRQUEUE | MSG_DONTWAIT);
  if (n < 0) return 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
    struct sock_extended_err *e = (void *)CMSG_DATA(c);
    if (e->ee_origin != SO_EE_ORIGIN_ZEROCOPY) continue;
    notes++; if (e->ee_code & SO_EE_CODE_ZEROCOPY_COPIED) copied++;
    if ((long)e->ee_data > done_hi) done_hi = e->ee_data;
  }
  return 1;
}
int main(int argc, char **argv) {
  if (argc >= 3 && !strcmp(argv[1], "recv")) {
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1; setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (bind(l, (void *)&a, sizeof a) || listen(l, 4)) { perror("bind"); return 1; }
    for (;;) { int c = accept(l, 0, 0); static char b[1 << 18]; while (read(c, b, sizeof b) > 0) {} close(c); }
  }
  long mb = argc == 7 ? atol(argv[4]) : 0, chunk = argc == 7 ? atol(argv[5]) : 0;
  int zc = argc == 7 ? atoi(argv[6]) : -1;
  if (argc != 7 || strcmp(argv[1], "send") || mb <= 0 || chunk <= 0 || (zc != 0 && zc != 1)) {
    fprintf(stderr, "usage: zc recv PORT | zc send IP PORT MIB CHUNK ZEROCOPY (MIB, CHUNK > 0; ZEROCOPY 0 or 1)\n");
    return 2;
  }
  int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  if (zc && setsockopt(s, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one)) { perror("SO_ZEROCOPY"); return 1; }
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))}; inet_pton(AF_INET, argv[2], &a.sin_addr);
  if (connect(s, (void *)&a, sizeof a)) { perror("connect"); return 1; }
  enum { NBUF = 8 }; char *bufs[NBUF]; for (int i = 0; i < NBUF; i++) {
    if (!(bufs[i] = malloc(chunk))) { fprintf(stderr, "cannot allocate %ld bytes\n", chunk); return 1; }
    memset(bufs[i], i, chunk);
  }
  long total = mb << 20, sent = 0, calls = 0; double c0 = cpu(), t0 = now();
  while (sent < total) {
    // A buffer is reused only after the kernel released it (notices carry send-call counters).
    while (zc && calls - (done_hi + 1) >= NBUF)
      if (!reap(s, 1)) { fprintf(stderr, "no completion notice within 5 s\n"); return 1; }
    ssize_t n = send(s, bufs[calls % NBUF], chunk, zc ? MSG_ZEROCOPY : 0);
    if (n < 0) {
      if (errno == ENOBUFS && reap(s, 1)) continue; // too many notices pending: take some first
      perror("send");
      return 1;
    }
    sent += n; calls++;
    if (zc) while (reap(s, 0)) {}
  }
  while (zc && done_hi + 1 < calls) if (!reap(s, 1)) break; // the last notices, 5 s at most each
  double c1 = cpu(), t1 = now();
  printf("zc=%d chunk=%ld: %.2f Gbit/s, sender CPU %.3f s per GB, notifications %ld (copied %ld)\n", zc, chunk,
         sent * 8 / (t1 - t0) / 1e9, (c1 - c0) / (sent / 1e9), notes, copied);
  close(s); return 0;
}
