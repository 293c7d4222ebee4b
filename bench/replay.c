/* The VM stand-in of bench/fleet.py in C: replays a boot read trace on a block device, as
 * `fleet_guest.py replay` does (same reads, same order, same overlap rule, same digest and
 * result JSON), without an interpreter. In a user-mode Linux guest every page fault and syscall
 * of a process is a ptrace round trip of the node's kernel thread, so the stand-in's own cost
 * lands on the data path it measures: this one makes one io_submit per read, one io_getevents
 * per batch of completions, and no other work per read than a CRC.
 *
 *   replay DEV TRACE.bin OUT.json GO_FILE|- DEPTH THINK(0|1)
 *
 * TRACE.bin (written by bench/fleet.py): u64 count, then count x {f64 t, u64 offset, u64 len},
 * little endian, offsets and lengths page aligned. Build: cc -O2 -o replay replay.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_DEPTH 64
#define MAX_SAMPLES 20000

struct rd { double t; uint64_t off, len; };

/* CRC-32 as zlib.crc32 computes it, slicing by 8 (~1 GB/s; bytewise was the replay's main cost) */
static uint32_t crc_table[8][256];
static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) crc_table[t][i] = crc_table[0][crc_table[t - 1][i] & 0xff] ^ (crc_table[t - 1][i] >> 8);
}
static uint32_t crc32_update(uint32_t crc, const unsigned char *p, size_t n) {
    crc = ~crc;
    while (n >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
        lo ^= crc;      /* little endian host (x86_64) */
        crc = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^ crc_table[5][(lo >> 16) & 0xff] ^
              crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xff] ^ crc_table[2][(hi >> 8) & 0xff] ^
              crc_table[1][(hi >> 16) & 0xff] ^ crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) crc = crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static const char *out_path;
static char errbuf[512];
static int errors, fatal;

static void write_json(const char *body) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", out_path);
    FILE *f = fopen(tmp, "w");
    if (!f) { perror(tmp); exit(2); }
    fputs(body, f);
    if (fclose(f) != 0 || rename(tmp, out_path) != 0) { perror(out_path); exit(2); }
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s DEV TRACE.bin OUT.json GO_FILE|- DEPTH THINK\n", argv[0]);
        return 2;
    }
    const char *dev = argv[1], *trace = argv[2], *go = argv[4];
    out_path = argv[3];
    int depth = atoi(argv[5]), think = atoi(argv[6]);
    if (depth < 1) depth = 1;
    if (depth > MAX_DEPTH) depth = MAX_DEPTH;
    crc_init();

    FILE *tf = fopen(trace, "rb");
    uint64_t count = 0;
    if (!tf || fread(&count, 8, 1, tf) != 1) { perror(trace); return 2; }
    struct rd *reads = calloc(count ? count : 1, sizeof *reads);
    uint32_t *crcs = calloc(count ? count : 1, sizeof *crcs);
    uint64_t total = 0, maxlen = 4096;
    for (uint64_t i = 0; i < count; i++) {
        if (fread(&reads[i], sizeof reads[i], 1, tf) != 1) { fprintf(stderr, "%s: short file\n", trace); return 2; }
        total += reads[i].len;
        if (reads[i].len > maxlen) maxlen = reads[i].len;
    }
    fclose(tf);

    int fd = open(dev, O_RDONLY | O_DIRECT);
    if (fd < 0) { perror(dev); return 2; }
    unsigned char *bufs[MAX_DEPTH];
    for (int s = 0; s < depth; s++) {
        bufs[s] = mmap(NULL, maxlen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (bufs[s] == MAP_FAILED) { perror("mmap"); return 2; }
    }
    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, depth, &ctx) < 0) { perror("io_setup"); return 2; }
    struct iocb cbs[MAX_DEPTH];
    struct io_event evs[MAX_DEPTH];
    int64_t inflight[MAX_DEPTH];          /* slot -> read index, -1 free */
    for (int s = 0; s < depth; s++) inflight[s] = -1;
    int nfree = depth;

    write_json("{\"ready\": true}");
    if (strcmp(go, "-") != 0) {
        double deadline = now() + 600;
        while (access(go, F_OK) != 0) {
            if (now() > deadline) { fprintf(stderr, "no start signal %s within 600s\n", go); return 2; }
            usleep(5000);
        }
    }
    double t0 = now(), next_show = t0, last = 0;
    uint64_t done = 0, nbytes = 0;
    static double st[MAX_SAMPLES];
    static uint64_t sb[MAX_SAMPLES];
    int ns = 0;

    /* wait for at least one completion (timeout_s < 0: no timeout) */
    #define COMPLETE(timeout_s) do { \
        struct timespec ts_, *tp_ = NULL; \
        if ((timeout_s) >= 0) { ts_.tv_sec = (time_t)(timeout_s); ts_.tv_nsec = (long)(((timeout_s) - ts_.tv_sec) * 1e9); tp_ = &ts_; } \
        long n_ = syscall(SYS_io_getevents, ctx, 1, depth, evs, tp_); \
        if (n_ < 0 && errno != EINTR) { snprintf(errbuf, sizeof errbuf, "io_getevents: %s", strerror(errno)); errors++; fatal = 1; } \
        for (long e_ = 0; e_ < n_; e_++) { \
            int s_ = (int)evs[e_].data; int64_t i_ = inflight[s_]; \
            inflight[s_] = -1; nfree++; \
            if (evs[e_].res != (int64_t)reads[i_].len) { \
                if (!errors) snprintf(errbuf, sizeof errbuf, "read %lld at %llu: %s", (long long)i_, \
                    (unsigned long long)reads[i_].off, evs[e_].res < 0 ? strerror((int)-evs[e_].res) : "short read"); \
                errors++; \
            } else { \
                crcs[i_] = crc32_update(0, bufs[s_], reads[i_].len); done++; nbytes += reads[i_].len; \
            } \
        } \
        last = now(); \
    } while (0)

    for (uint64_t i = 0; i < count && !errors; i++) {
        uint64_t off = reads[i].off, n = reads[i].len;
        if (think) {
            double wait;
            while ((wait = t0 + reads[i].t - now()) > 0) {
                if (nfree < depth) COMPLETE(wait); else usleep((useconds_t)(wait * 1e6));
            }
        }
        /* a read overlapping one in flight waits for it; so does one that finds no free slot */
        for (;;) {
            int busy = nfree == 0;
            for (int s = 0; s < depth && !busy; s++) {
                int64_t j = inflight[s];
                if (j >= 0 && reads[j].off < off + n && off < reads[j].off + reads[j].len) busy = 1;
            }
            if (!busy) break;
            COMPLETE(-1.0);
            if (errors) break;
        }
        if (errors) break;
        int slot = 0;
        while (inflight[slot] >= 0) slot++;
        struct iocb *cb = &cbs[slot];
        memset(cb, 0, sizeof *cb);
        cb->aio_data = slot;
        cb->aio_lio_opcode = IOCB_CMD_PREAD;
        cb->aio_fildes = fd;
        cb->aio_buf = (uint64_t)(uintptr_t)bufs[slot];
        cb->aio_nbytes = n;
        cb->aio_offset = (int64_t)off;
        inflight[slot] = (int64_t)i;
        nfree--;
        struct iocb *list[1] = {cb};
        if (syscall(SYS_io_submit, ctx, 1, list) != 1) {
            snprintf(errbuf, sizeof errbuf, "io_submit: %s", strerror(errno));
            errors++;
            inflight[slot] = -1;
            nfree++;
            break;
        }
        double t = now();
        if (t >= next_show) {
            if (ns < MAX_SAMPLES) { st[ns] = t - t0; sb[ns] = nbytes; ns++; }
            char body[512];
            snprintf(body, sizeof body, "{\"start\": %.6f, \"t\": %.6f, \"done\": %llu, \"bytes\": %llu, \"reads\": %llu, \"total\": %llu}",
                     t0, t, (unsigned long long)done, (unsigned long long)nbytes, (unsigned long long)count, (unsigned long long)total);
            write_json(body);
            next_show = t + 0.25;
        }
    }
    while (nfree < depth && !fatal)          /* drain what is in flight, also after an error */
        COMPLETE(-1.0);
    double t1 = last ? last : now();
    if (ns < MAX_SAMPLES) { st[ns] = t1 - t0; sb[ns] = nbytes; ns++; }
    uint32_t acc = 0;
    for (uint64_t i = 0; i < count; i++) {
        unsigned char le[4] = {crcs[i] & 0xff, (crcs[i] >> 8) & 0xff, (crcs[i] >> 16) & 0xff, crcs[i] >> 24};
        acc = crc32_update(acc, le, 4);
    }
    size_t cap = 1024 + (size_t)ns * 48 + sizeof errbuf;
    char *body = malloc(cap), *p = body;
    p += sprintf(p, "{\"start\": %.6f, \"end\": %.6f, \"reads\": %llu, \"done\": %llu, \"bytes\": %llu, \"total\": %llu, "
                    "\"digest\": \"%08x\", \"errors\": [", t0, t1, (unsigned long long)count, (unsigned long long)done,
                 (unsigned long long)nbytes, (unsigned long long)total, acc);
    if (errors) {
        p += sprintf(p, "\"");
        for (const char *c = errbuf; *c; c++) if (*c != '"' && *c != '\\') *p++ = *c;
        p += sprintf(p, "\"");
    }
    p += sprintf(p, "], \"samples\": [");
    for (int k = 0; k < ns; k++) p += sprintf(p, "%s[%.3f, %llu]", k ? ", " : "", st[k], (unsigned long long)sb[k]);
    p += sprintf(p, "], \"finished\": %s, \"impl\": \"c\"}",
                 !errors && done == count ? "true" : "false");
    write_json(body);
    return errors ? 1 : 0;
}
