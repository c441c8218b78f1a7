/* SYNs at a fixed rate to one port, sent in sendmmsg() batches from a raw socket (run inside
 * a lab namespace; bench/compare.py compiles it on the fly). Python's bench/synflood.py tops
 * out near 45k/s on our 2-core machine; this reaches the storm target (50k/s) with CPU to spare.
 * Source ports cycle over SPORT_LO..SPORT_HI, each with a fixed random sequence number.
 * usage: synstorm SRC DST PORT RATE SECONDS [SPORT_LO SPORT_HI]
 * prints {"sent": N, "seconds": S} */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define PKT_LEN 40

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint16_t csum(const uint8_t *b, size_t n, uint32_t sum) {
    for (size_t i = 0; i + 1 < n; i += 2)
        sum += (uint32_t)b[i] << 8 | b[i + 1];
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static void build(uint8_t *p, struct in_addr src, struct in_addr dst, uint16_t sport, uint16_t dport,
                  uint32_t seq) {
    memset(p, 0, PKT_LEN);
    p[0] = 0x45;
    p[3] = PKT_LEN;
    p[8] = 64;            /* TTL */
    p[9] = IPPROTO_TCP;   /* IP checksum and id are filled in by the kernel (IPPROTO_RAW) */
    memcpy(p + 12, &src, 4);
    memcpy(p + 16, &dst, 4);
    uint8_t *t = p + 20;
    t[0] = sport >> 8, t[1] = sport & 0xff;
    t[2] = dport >> 8, t[3] = dport & 0xff;
    t[4] = seq >> 24, t[5] = seq >> 16, t[6] = seq >> 8, t[7] = seq;
    t[12] = 5 << 4;
    t[13] = 0x02;         /* SYN */
    t[14] = 64240 >> 8, t[15] = 64240 & 0xff;
    uint8_t pseudo[12];
    memcpy(pseudo, p + 12, 8);
    pseudo[8] = 0, pseudo[9] = IPPROTO_TCP, pseudo[10] = 0, pseudo[11] = 20;
    uint16_t c = csum(t, 20, 0xffff & ~csum(pseudo, 12, 0));
    t[16] = c >> 8, t[17] = c & 0xff;
}

int main(int argc, char **argv) {
    if (argc != 6 && argc != 8) {
        fprintf(stderr, "usage: synstorm SRC DST PORT RATE SECONDS [SPORT_LO SPORT_HI]\n");
        return 2;
    }
    struct in_addr src, dst;
    if (!inet_aton(argv[1], &src) || !inet_aton(argv[2], &dst)) {
        fprintf(stderr, "synstorm: bad address\n");
        return 2;
    }
    int port = atoi(argv[3]);
    double rate = atof(argv[4]), seconds = atof(argv[5]);
    int lo = argc == 8 ? atoi(argv[6]) : 20000, hi = argc == 8 ? atoi(argv[7]) : 59999;
    if (port <= 0 || port > 65535 || rate <= 0 || seconds <= 0 || lo <= 0 || hi > 65535 || lo > hi) {
        fprintf(stderr, "synstorm: bad port, rate, duration or source port range\n");
        return 2;
    }
    int nports = hi - lo + 1;
    uint8_t *pkts = malloc((size_t)nports * PKT_LEN);
    if (!pkts) {
        perror("synstorm: malloc");
        return 1;
    }
    srandom(getpid() ^ (unsigned)time(NULL));
    for (int i = 0; i < nports; i++)
        build(pkts + (size_t)i * PKT_LEN, src, dst, lo + i, port, (uint32_t)random() << 1 ^ (uint32_t)random());

    int s = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
    if (s < 0) {
        perror("synstorm: raw socket");
        return 1;
    }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_addr = dst};
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        msgs[i].msg_hdr.msg_name = &to;
        msgs[i].msg_hdr.msg_namelen = sizeof to;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        iov[i].iov_len = PKT_LEN;
    }
    long long sent = 0;
    double start = now(), end = start + seconds, t;
    while ((t = now()) < end) {
        long long due = (long long)((t - start) * rate) - sent;
        while (due > 0 && now() < end) {   /* behind (CPU taken): catch up, but only until the end */
            int n = due < BATCH ? (int)due : BATCH;
            for (int i = 0; i < n; i++)
                iov[i].iov_base = pkts + (size_t)((sent + i) % nports) * PKT_LEN;
            int k = sendmmsg(s, msgs, n, 0);
            if (k <= 0) {   /* ENOBUFS and the like: try again on the next tick */
                break;
            }
            sent += k;
            due -= k;
        }
        struct timespec nap = {0, 500000};
        nanosleep(&nap, NULL);
    }
    printf("{\"sent\": %lld, \"seconds\": %.3f}\n", sent, now() - start);
    return 0;
}
