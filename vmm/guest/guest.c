/*
 * The snapvmm micro-guest: a few hundred lines of freestanding 64-bit C that exercise the VMM
 * the way a real guest would, on a host whose KVM cannot boot Linux (DESIGN.md §6).
 *
 * The VMM enters every vCPU at _start (start.S) in long mode, identity-mapped, interrupts off,
 * with the boot info (struct boot_info, mirrored in vmm/src/guest.rs) at a fixed page. vCPU 0
 * runs the workload; the others announce themselves and park. Output goes to the 8250 UART at
 * 0x3f8; the VM ends by pulsing the reset line of the i8042 (0xFE to port 0x64).
 *
 * Disks are virtio-blk over virtio-mmio version 2, driven by polling split virtqueues (the
 * guest never enables interrupts, which keeps it small and makes it immune to lost IRQs).
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define BOOT_INFO_MAGIC 0x314d4d5650414e53UL /* "SNAPVMM1" little-endian */
#define MAX_DEVICES 16
#define MAX_QUEUES 4
#define QUEUE_SIZE 16
#define CHUNK (64 * 1024)      /* bytes per write-verify request */
#define LOOP_CHUNK (16 * 1024) /* bytes per io-loop request */
#define LOOP_DISKS 4
#define LOOP_MAX_CHUNKS 4096
#define PROGRESS_TICKS (1UL << 29) /* io-loop progress line at least every ~0.2 s (2.5 GHz) */
#define BENCH_BLOCK 4096           /* bytes per io-bench request */
#define BENCH_WINDOW 64            /* io-bench requests per report line */
#define WRITE_VERIFY_LIMIT (64UL << 20)

enum workload {
    WORKLOAD_COUNTER = 1,
    WORKLOAD_WRITE_VERIFY = 2,
    WORKLOAD_IO_LOOP = 3,
    WORKLOAD_IO_BENCH = 4,
    WORKLOAD_TOUCH = 5,
    WORKLOAD_AGENT = 6,
};

/* Values the host writes into boot_info.control while the guest runs. */
#define CONTROL_FINISH 1 /* io-loop: verify everything written, report, reset; io-bench: reset */

struct boot_device {
    u64 mmio_base;
    u32 gsi;
    u32 reserved;
};

struct boot_info {
    u64 magic;
    u32 workload;
    u32 num_cpus;
    u64 seed;
    u32 num_devices;
    u32 control; /* written by the host at any time: CONTROL_* */
    struct boot_device devices[MAX_DEVICES];
    u64 vmgenid_addr; /* the 16-byte VM generation ID, rewritten by the host on every restore */
};

static u32 control_word(struct boot_info *info) { return *(volatile u32 *)&info->control; }

/* Per-vCPU stacks; start.S picks one by vCPU index (GUEST_STACK_SHIFT, GUEST_MAX_CPUS). */
u8 guest_stacks[GUEST_MAX_CPUS][1UL << GUEST_STACK_SHIFT] __attribute__((aligned(4096)));

/* ---- freestanding runtime ---------------------------------------------------------------- */

void *memset(void *dst, int c, u64 n)
{
    u8 *d = dst;
    while (n--)
        *d++ = (u8)c;
    return dst;
}

void *memcpy(void *dst, const void *src, u64 n)
{
    u8 *d = dst;
    const u8 *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64)hi << 32 | lo;
}

static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u8 mmio_read8(u64 addr) { return *(volatile u8 *)addr; }

/* ---- serial ------------------------------------------------------------------------------ */

#define COM1 0x3f8

static void putc(char c)
{
    while (!(inb(COM1 + 5) & 0x20)) /* LSR: transmitter holding register empty */
        cpu_relax();
    outb(COM1, (u8)c);
}

static void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

static void put_dec(u64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts(&buf[i]);
}

static void put_hex(u64 v)
{
    static const char digits[] = "0123456789abcdef";
    char buf[19];
    int i = 18;
    buf[i] = 0;
    do {
        buf[--i] = digits[v & 15];
        v >>= 4;
    } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    puts(&buf[i]);
}

static void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* Asks the VMM to end the VM: the i8042 "pulse reset line" command. */
static void reset(void)
{
    outb(0x64, 0xfe);
    halt_forever();
}

/* ---- the data pattern (mirrored by vmm::guest::pattern_word for host-side checks) -------- */

static u64 mix64(u64 z)
{
    z += 0x9e3779b97f4a7c15UL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
    return z ^ (z >> 31);
}

static u64 pattern_word(u64 seed, u64 disk, u64 generation, u64 offset)
{
    return mix64(seed ^ (disk << 56) ^ (generation << 32) ^ (offset >> 3));
}

static void fill_pattern(u64 *buf, u64 len, u64 seed, u64 disk, u64 gen, u64 offset)
{
    for (u64 i = 0; i < len / 8; i++)
        buf[i] = pattern_word(seed, disk, gen, offset + i * 8);
}

/* Returns the byte offset (within the buffer) of the first mismatching word, or len. */
static u64 check_pattern(const u64 *buf, u64 len, u64 seed, u64 disk, u64 gen, u64 offset)
{
    for (u64 i = 0; i < len / 8; i++)
        if (buf[i] != pattern_word(seed, disk, gen, offset + i * 8))
            return i * 8;
    return len;
}

/* ---- virtio-mmio / virtio-blk ------------------------------------------------------------ */

#define VIRTIO_MMIO_MAGIC 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_AVAIL_LOW 0x090
#define VIRTIO_MMIO_QUEUE_AVAIL_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_USED_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_USED_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG 0x100

#define STATUS_ACKNOWLEDGE 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8

#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_MQ 12
#define VIRTIO_BLK_F_DISCARD 13
#define VIRTIO_BLK_F_WRITE_ZEROES 14
#define VIRTIO_F_VERSION_1 32

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13

#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

struct vring_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct vring_avail {
    u16 flags;
    u16 idx;
    u16 ring[QUEUE_SIZE];
    u16 used_event;
};

struct vring_used_elem {
    u32 id;
    u32 len;
};

struct vring_used {
    u16 flags;
    u16 idx;
    struct vring_used_elem ring[QUEUE_SIZE];
    u16 avail_event;
};

struct blk_req_header {
    u32 type;
    u32 reserved;
    u64 sector;
};

struct blk_discard_range {
    u64 sector;
    u32 num_sectors;
    u32 flags;
};

/* One in-flight request at a time per queue: header, up to two data buffers, status. */
struct queue {
    struct vring_desc desc[QUEUE_SIZE] __attribute__((aligned(16)));
    struct vring_avail avail __attribute__((aligned(2)));
    struct vring_used used __attribute__((aligned(4)));
    struct blk_req_header header;
    struct blk_discard_range range;
    volatile u8 status;
    u16 last_used;
    u16 index;
};

struct disk {
    u64 base;
    u64 features;
    u64 capacity; /* bytes */
    u32 num_queues;
    int ok;
    struct queue queues[MAX_QUEUES];
};

static struct disk disks[MAX_DEVICES];
static u8 io_buffers[MAX_QUEUES][CHUNK] __attribute__((aligned(4096)));

static int disk_init(struct disk *d, u64 base, u32 index)
{
    d->base = base;
    if (mmio_read32(base + VIRTIO_MMIO_MAGIC) != 0x74726976 ||
        mmio_read32(base + VIRTIO_MMIO_VERSION) != 2 ||
        mmio_read32(base + VIRTIO_MMIO_DEVICE_ID) != 2) {
        puts("virtio: device ");
        put_dec(index);
        puts(" is not a virtio-mmio v2 block device\n");
        return 0;
    }
    mmio_write32(base + VIRTIO_MMIO_STATUS, 0);
    mmio_write32(base + VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE);
    mmio_write32(base + VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);

    mmio_write32(base + VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    u64 offered = mmio_read32(base + VIRTIO_MMIO_DEVICE_FEATURES);
    mmio_write32(base + VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    offered |= (u64)mmio_read32(base + VIRTIO_MMIO_DEVICE_FEATURES) << 32;
    u64 wanted = (1UL << VIRTIO_F_VERSION_1) | (1UL << VIRTIO_BLK_F_RO) |
                 (1UL << VIRTIO_BLK_F_FLUSH) | (1UL << VIRTIO_BLK_F_MQ) |
                 (1UL << VIRTIO_BLK_F_DISCARD) | (1UL << VIRTIO_BLK_F_WRITE_ZEROES);
    d->features = offered & wanted;
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES, (u32)d->features);
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES, (u32)(d->features >> 32));
    mmio_write32(base + VIRTIO_MMIO_STATUS,
                 STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(mmio_read32(base + VIRTIO_MMIO_STATUS) & STATUS_FEATURES_OK)) {
        puts("virtio: device refused features\n");
        return 0;
    }

    /* Config space: capacity (le64, sectors) at 0, num_queues (le16) at 34. */
    u64 capacity = mmio_read32(base + VIRTIO_MMIO_CONFIG) |
                   ((u64)mmio_read32(base + VIRTIO_MMIO_CONFIG + 4) << 32);
    d->capacity = capacity * 512;
    d->num_queues = 1;
    if (d->features & (1UL << VIRTIO_BLK_F_MQ)) {
        u32 n = mmio_read8(base + VIRTIO_MMIO_CONFIG + 34) |
                ((u32)mmio_read8(base + VIRTIO_MMIO_CONFIG + 35) << 8);
        d->num_queues = n == 0 ? 1 : (n > MAX_QUEUES ? MAX_QUEUES : n);
    }

    for (u32 q = 0; q < d->num_queues; q++) {
        struct queue *vq = &d->queues[q];
        vq->index = (u16)q;
        mmio_write32(base + VIRTIO_MMIO_QUEUE_SEL, q);
        u32 max = mmio_read32(base + VIRTIO_MMIO_QUEUE_NUM_MAX);
        if (max < QUEUE_SIZE) {
            puts("virtio: queue too small\n");
            return 0;
        }
        mmio_write32(base + VIRTIO_MMIO_QUEUE_NUM, QUEUE_SIZE);
        u64 desc = (u64)vq->desc, avail = (u64)&vq->avail, used = (u64)&vq->used;
        mmio_write32(base + VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)desc);
        mmio_write32(base + VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)(desc >> 32));
        mmio_write32(base + VIRTIO_MMIO_QUEUE_AVAIL_LOW, (u32)avail);
        mmio_write32(base + VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (u32)(avail >> 32));
        mmio_write32(base + VIRTIO_MMIO_QUEUE_USED_LOW, (u32)used);
        mmio_write32(base + VIRTIO_MMIO_QUEUE_USED_HIGH, (u32)(used >> 32));
        mmio_write32(base + VIRTIO_MMIO_QUEUE_READY, 1);
    }
    mmio_write32(base + VIRTIO_MMIO_STATUS,
                 STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    return 1;
}

/*
 * Posts one request on a queue: header, then `data` split into two descriptors (so the device
 * sees multi-segment requests), then the status byte. Does not wait.
 */
static void submit(struct disk *d, struct queue *vq, u32 type, u64 sector, void *data, u32 len,
                   int device_writes)
{
    vq->header.type = type;
    vq->header.reserved = 0;
    vq->header.sector = sector;
    vq->status = 0xff;

    u16 n = 0;
    vq->desc[n] = (struct vring_desc){(u64)&vq->header, sizeof(vq->header), VRING_DESC_F_NEXT,
                                      (u16)(n + 1)};
    n++;
    u16 data_flags = VRING_DESC_F_NEXT | (device_writes ? VRING_DESC_F_WRITE : 0);
    if (len >= 1024) {
        u32 half = len / 2 & ~511u;
        vq->desc[n] = (struct vring_desc){(u64)data, half, data_flags, (u16)(n + 1)};
        n++;
        vq->desc[n] = (struct vring_desc){(u64)data + half, len - half, data_flags, (u16)(n + 1)};
        n++;
    } else if (len) {
        vq->desc[n] = (struct vring_desc){(u64)data, len, data_flags, (u16)(n + 1)};
        n++;
    }
    vq->desc[n] = (struct vring_desc){(u64)&vq->status, 1, VRING_DESC_F_WRITE, 0};

    vq->avail.ring[vq->avail.idx % QUEUE_SIZE] = 0;
    mb();
    vq->avail.idx++;
    mb();
    mmio_write32(d->base + VIRTIO_MMIO_QUEUE_NOTIFY, vq->index);
}

/* Waits for the queue's request to complete and returns its status byte. */
static u8 complete(struct disk *d, struct queue *vq)
{
    while (*(volatile u16 *)&vq->used.idx == vq->last_used)
        cpu_relax();
    mb();
    vq->last_used++;
    /* Acknowledge the interrupt the device raised, as a driver must, though we poll. */
    u32 isr = mmio_read32(d->base + VIRTIO_MMIO_INTERRUPT_STATUS);
    if (isr)
        mmio_write32(d->base + VIRTIO_MMIO_INTERRUPT_ACK, isr);
    return vq->status;
}

static u8 request(struct disk *d, u32 type, u64 sector, void *data, u32 len, int device_writes)
{
    submit(d, &d->queues[0], type, sector, data, len, device_writes);
    return complete(d, &d->queues[0]);
}

static void report_io_error(u32 disk, const char *what, u64 sector, u64 status)
{
    puts("io error disk ");
    put_dec(disk);
    puts(" ");
    puts(what);
    puts(" sector ");
    put_dec(sector);
    puts(" status ");
    put_dec(status);
    puts("\n");
}

static void report_mismatch(u32 disk, u64 byte)
{
    puts("io error disk ");
    put_dec(disk);
    puts(" mismatch at byte ");
    put_hex(byte);
    puts("\n");
}

/* ---- VM generation ID -------------------------------------------------------------------- */

/*
 * Returns 0 while the ID stays the same, else a non-zero mix of the new one: what a guest
 * reseeds its random numbers with, so clones of one snapshot part ways.
 *
 * The generation last seen lives in guest memory, so a restored or cloned guest compares the
 * ID the host wrote at the load with the one it saw before the snapshot, and reports the
 * change: "generation <32 hex digits>" (byte 0 first), at boot and whenever it changes.
 */
static u64 generation_seen[2];

static u64 check_generation(struct boot_info *info)
{
    static const char digits[] = "0123456789abcdef";
    if (!info->vmgenid_addr)
        return 0;
    volatile u8 *id = (volatile u8 *)info->vmgenid_addr;
    u64 now[2] = {0, 0};
    for (int i = 0; i < 16; i++)
        now[i / 8] |= (u64)id[i] << (8 * (i % 8));
    if (now[0] == generation_seen[0] && now[1] == generation_seen[1])
        return 0;
    generation_seen[0] = now[0];
    generation_seen[1] = now[1];
    char line[11 + 32 + 2];
    memcpy(line, "generation ", 11);
    for (int i = 0; i < 16; i++) {
        u8 b = (u8)(now[i / 8] >> (8 * (i % 8)));
        line[11 + 2 * i] = digits[b >> 4];
        line[12 + 2 * i] = digits[b & 15];
    }
    line[43] = '\n';
    line[44] = 0;
    puts(line);
    return (now[0] ^ now[1]) | 1;
}

/* ---- workloads --------------------------------------------------------------------------- */

/* The counter lives in guest memory, so a restored snapshot continues where it left off. */
static volatile u64 counter_value;

static void run_counter(struct boot_info *info)
{
    for (;;) {
        check_generation(info);
        counter_value++;
        puts("counter ");
        put_dec(counter_value);
        puts("\n");
        /* About 20 ms at 2.5 GHz: paced by the TSC, not by a loop whose speed varies with
         * the host (this host's KVM emulates many guest memory accesses). */
        u64 start = rdtsc();
        while (rdtsc() - start < 50000000UL)
            cpu_relax();
    }
}

/*
 * touch: writes a pattern over `seed` MiB of RAM from TOUCH_BASE on (64 MiB when the seed is
 * 0; the VM needs 16 MiB more than that), prints "touch done mib N", then runs the counter, reading one
 * word of every touched page between lines: a guest with a known working set, for measuring
 * how much memory clones of it share.
 */
#define TOUCH_BASE (16UL << 20)

static void run_touch(struct boot_info *info)
{
    /* The guest does not know its RAM size: the host gives it 16 + N MiB or more. */
    u64 mib = info->seed ? info->seed : 64;
    volatile u64 *region = (volatile u64 *)TOUCH_BASE;
    u64 words = (mib << 20) / 8;
    for (u64 i = 0; i < words; i++)
        region[i] = mix64(i);
    puts("touch done mib ");
    put_dec(mib);
    puts("\n");
    u64 sum = 0;
    for (;;) {
        check_generation(info);
        counter_value++;
        puts("counter ");
        put_dec(counter_value);
        puts("\n");
        for (u64 i = 0; i < words; i += 4096 / 8)
            sum += region[i];
        __asm__ volatile("" ::"r"(sum));
    }
}

static void print_disk_id(struct disk *d, u32 index)
{
    static char id[21];
    memset(id, 0, sizeof(id));
    u8 status = request(d, VIRTIO_BLK_T_GET_ID, 0, id, 20, 1);
    if (status != VIRTIO_BLK_S_OK) {
        report_io_error(index, "get-id", 0, status);
        return;
    }
    puts("disk ");
    put_dec(index);
    puts(" id ");
    puts(id);
    puts("\n");
}

/* Writes the pattern over [0, limit) with requests spread over every queue, then reads back. */
static int write_verify_disk(struct disk *d, u32 index, u64 seed)
{
    u64 limit = d->capacity < WRITE_VERIFY_LIMIT ? d->capacity : WRITE_VERIFY_LIMIT;
    limit &= ~(u64)(CHUNK - 1);
    u32 nq = d->num_queues;

    for (int pass = 0; pass < 2; pass++) {
        int writing = pass == 0;
        for (u64 batch = 0; batch < limit; batch += (u64)CHUNK * nq) {
            u32 posted = 0;
            for (u32 q = 0; q < nq && batch + (u64)q * CHUNK < limit; q++) {
                u64 off = batch + (u64)q * CHUNK;
                if (writing)
                    fill_pattern((u64 *)io_buffers[q], CHUNK, seed, index, 1, off);
                else
                    memset(io_buffers[q], 0, CHUNK);
                submit(d, &d->queues[q], writing ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, off / 512,
                       io_buffers[q], CHUNK, !writing);
                posted++;
            }
            for (u32 q = 0; q < posted; q++) {
                u64 off = batch + (u64)q * CHUNK;
                u8 status = complete(d, &d->queues[q]);
                if (status != VIRTIO_BLK_S_OK) {
                    report_io_error(index, writing ? "write" : "read", off / 512, status);
                    return 0;
                }
                if (!writing) {
                    u64 bad = check_pattern((u64 *)io_buffers[q], CHUNK, seed, index, 1, off);
                    if (bad != CHUNK) {
                        report_mismatch(index, off + bad);
                        return 0;
                    }
                }
            }
        }
    }

    /* Write-zeroes then read back zeroes; restore the pattern afterwards. */
    if (d->features & (1UL << VIRTIO_BLK_F_WRITE_ZEROES) && limit >= CHUNK) {
        struct queue *vq = &d->queues[0];
        vq->range = (struct blk_discard_range){0, CHUNK / 512, 0};
        u8 status = request(d, VIRTIO_BLK_T_WRITE_ZEROES, 0, &vq->range, sizeof(vq->range), 0);
        if (status != VIRTIO_BLK_S_OK) {
            report_io_error(index, "write-zeroes", 0, status);
            return 0;
        }
        memset(io_buffers[0], 0xaa, CHUNK);
        status = request(d, VIRTIO_BLK_T_IN, 0, io_buffers[0], CHUNK, 1);
        for (u32 i = 0; status == VIRTIO_BLK_S_OK && i < CHUNK; i++) {
            if (io_buffers[0][i]) {
                puts("io error disk ");
                put_dec(index);
                puts(" write-zeroes left data\n");
                return 0;
            }
        }
        fill_pattern((u64 *)io_buffers[0], CHUNK, seed, index, 1, 0);
        status = request(d, VIRTIO_BLK_T_OUT, 0, io_buffers[0], CHUNK, 0);
        if (status != VIRTIO_BLK_S_OK) {
            report_io_error(index, "rewrite", 0, status);
            return 0;
        }
    }
    /* Discard must be accepted; its result is unspecified, so the range is rewritten. */
    if (d->features & (1UL << VIRTIO_BLK_F_DISCARD) && limit >= 2 * CHUNK) {
        struct queue *vq = &d->queues[0];
        vq->range = (struct blk_discard_range){CHUNK / 512, CHUNK / 512, 0};
        u8 status = request(d, VIRTIO_BLK_T_DISCARD, 0, &vq->range, sizeof(vq->range), 0);
        if (status != VIRTIO_BLK_S_OK) {
            report_io_error(index, "discard", CHUNK / 512, status);
            return 0;
        }
        fill_pattern((u64 *)io_buffers[0], CHUNK, seed, index, 1, CHUNK);
        status = request(d, VIRTIO_BLK_T_OUT, CHUNK / 512, io_buffers[0], CHUNK, 0);
        if (status != VIRTIO_BLK_S_OK) {
            report_io_error(index, "rewrite", CHUNK / 512, status);
            return 0;
        }
    }
    /* A read past the end must fail cleanly. */
    u8 status = request(d, VIRTIO_BLK_T_IN, d->capacity / 512, io_buffers[0], 512, 1);
    if (status != VIRTIO_BLK_S_IOERR) {
        report_io_error(index, "read-past-end", d->capacity / 512, status);
        return 0;
    }
    if (d->features & (1UL << VIRTIO_BLK_F_FLUSH)) {
        status = request(d, VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0);
        if (status != VIRTIO_BLK_S_OK) {
            report_io_error(index, "flush", 0, status);
            return 0;
        }
    }
    puts("disk ");
    put_dec(index);
    puts(" verify ok queues ");
    put_dec(nq);
    puts(" bytes ");
    put_dec(limit);
    puts("\n");
    return 1;
}

/* A read-only disk must refuse writes with IOERR and still serve reads. */
static int check_read_only_disk(struct disk *d, u32 index)
{
    memset(io_buffers[0], 0, 4096);
    u8 status = request(d, VIRTIO_BLK_T_OUT, 0, io_buffers[0], 4096, 0);
    if (status != VIRTIO_BLK_S_IOERR) {
        report_io_error(index, "write-to-read-only", 0, status);
        return 0;
    }
    status = request(d, VIRTIO_BLK_T_IN, 0, io_buffers[0], 4096, 1);
    if (status != VIRTIO_BLK_S_OK) {
        report_io_error(index, "read", 0, status);
        return 0;
    }
    puts("disk ");
    put_dec(index);
    puts(" read-only ok\n");
    return 1;
}

static void run_write_verify(struct boot_info *info, u32 ndisks)
{
    int ok = ndisks > 0;
    for (u32 i = 0; i < ndisks; i++) {
        struct disk *d = &disks[i];
        if (!d->ok) {
            ok = 0;
            continue;
        }
        print_disk_id(d, i);
        if (d->features & (1UL << VIRTIO_BLK_F_RO))
            ok &= check_read_only_disk(d, i);
        else
            ok &= write_verify_disk(d, i, info->seed);
    }
    puts(ok ? "verify ok\n" : "verify failed\n");
    reset();
}

/* Generation of the data last written to each io-loop chunk; 0 = not written by us. */
static u32 generations[LOOP_DISKS][LOOP_MAX_CHUNKS];

struct io_loop {
    u64 seed;
    u32 usable[LOOP_DISKS]; /* disk index of each slot */
    u32 nusable;
    u64 ops, errors;
};

static u64 loop_chunks(struct disk *d)
{
    u64 chunks = d->capacity / LOOP_CHUNK;
    return chunks > LOOP_MAX_CHUNKS ? LOOP_MAX_CHUNKS : chunks;
}

/* Reads chunk `chunk` of slot `slot` and checks it holds the generation last written there. */
static void io_loop_read(struct io_loop *l, u32 slot, u64 chunk)
{
    u32 index = l->usable[slot];
    u64 off = chunk * LOOP_CHUNK;
    u8 *buf = io_buffers[0];
    u8 status = request(&disks[index], VIRTIO_BLK_T_IN, off / 512, buf, LOOP_CHUNK, 1);
    u32 gen = generations[slot][chunk];
    if (status != VIRTIO_BLK_S_OK) {
        report_io_error(index, "read", off / 512, status);
        l->errors++;
    } else if (gen) {
        u64 bad = check_pattern((u64 *)buf, LOOP_CHUNK, l->seed, index, gen, off);
        if (bad != LOOP_CHUNK) {
            report_mismatch(index, off + bad);
            l->errors++;
        }
    }
}

static void io_loop_write(struct io_loop *l, u32 slot, u64 chunk)
{
    u32 index = l->usable[slot];
    u64 off = chunk * LOOP_CHUNK;
    u8 *buf = io_buffers[0];
    u32 gen = generations[slot][chunk] + 1;
    fill_pattern((u64 *)buf, LOOP_CHUNK, l->seed, index, gen, off);
    u8 status = request(&disks[index], VIRTIO_BLK_T_OUT, off / 512, buf, LOOP_CHUNK, 0);
    if (status == VIRTIO_BLK_S_OK)
        generations[slot][chunk] = gen;
    else {
        report_io_error(index, "write", off / 512, status);
        l->errors++;
    }
}

static void io_loop_progress(struct io_loop *l)
{
    puts("io-loop ops ");
    put_dec(l->ops);
    puts(" errors ");
    put_dec(l->errors);
    puts("\n");
}

/*
 * The end of an io-loop the host asked for: every chunk written is read back and checked
 * against the generation written last, so the data that crossed snapshots, streams and
 * pivots is verified by the guest itself. Then the VM resets.
 */
static void io_loop_finish(struct io_loop *l)
{
    u64 checked = 0;
    for (u32 slot = 0; slot < l->nusable; slot++) {
        struct disk *d = &disks[l->usable[slot]];
        u64 chunks = loop_chunks(d);
        for (u64 chunk = 0; chunk < chunks; chunk++) {
            if (!generations[slot][chunk])
                continue;
            io_loop_read(l, slot, chunk);
            checked++;
        }
        if (d->features & (1UL << VIRTIO_BLK_F_FLUSH))
            request(d, VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0);
    }
    io_loop_progress(l);
    /* Any error during the run fails the verdict, not only those of this last pass. */
    puts(l->errors == 0 ? "io-loop verify ok chunks " : "io-loop verify failed chunks ");
    put_dec(checked);
    puts("\n");
    reset();
}

/* ---- virtio-vsock and the guest agent ---------------------------------------------------- */

/*
 * A minimal virtio-vsock driver (device ID 19, same polled virtio-mmio transport as the disks)
 * and, on top, the agent of workload `agent`: a listener on AGENT_PORT answering the qemu-ga
 * subset the VMM speaks (guest-sync-delimited, guest-ping, guest-fsfreeze-freeze/status/thaw).
 * With no filesystem to freeze, a freeze flushes the disks and stops the io-loop's requests
 * until the thaw; the thaw reports how many writes completed while frozen (always 0 if the
 * freeze holds) on the serial line `agent thawed writes W frozen writes F`.
 *
 * Packets are taken whole from single-descriptor RX buffers; packets are sent one at a time
 * from one TX descriptor, waiting for the device to take each. After a checkpoint load the
 * device sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: every connection is forgotten and the
 * listener takes new ones.
 */

#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_VSOCK 19
#define AGENT_PORT 52 /* vmm::guest::AGENT_PORT */
#define VSOCK_HOST_CID 2
#define VSOCK_TYPE_STREAM 1
#define VSOCK_OP_REQUEST 1
#define VSOCK_OP_RESPONSE 2
#define VSOCK_OP_RST 3
#define VSOCK_OP_SHUTDOWN 4
#define VSOCK_OP_RW 5
#define VSOCK_OP_CREDIT_UPDATE 6
#define VSOCK_OP_CREDIT_REQUEST 7
#define VSOCK_EVENT_TRANSPORT_RESET 0
#define VSOCK_RX_BUF 4096
#define VSOCK_BUF_ALLOC (64 * 1024) /* receive buffer announced per connection */
#define VSOCK_CONNS 4
#define AGENT_LINE_MAX 512
#define VSOCK_TX_SPINS (1UL << 32) /* bounded wait for the device to take a packet */

struct vsock_hdr {
    u64 src_cid;
    u64 dst_cid;
    u32 src_port;
    u32 dst_port;
    u32 len;
    u16 type;
    u16 op;
    u32 flags;
    u32 buf_alloc;
    u32 fwd_cnt;
} __attribute__((packed));

struct vsock_vq {
    struct vring_desc desc[QUEUE_SIZE] __attribute__((aligned(16)));
    struct vring_avail avail __attribute__((aligned(2)));
    struct vring_used used __attribute__((aligned(4)));
    u16 last_used;
};

struct vsock_conn {
    int used;
    u32 peer_port;    /* the host side's port */
    u32 fwd_cnt;      /* bytes of the host's we consumed */
    u32 announced;    /* fwd_cnt as last told to the host */
    u32 peer_buf_alloc, peer_fwd_cnt, tx_cnt;
    u32 line_len;
    int overflow;     /* the current line outgrew AGENT_LINE_MAX: answered as an error */
    char line[AGENT_LINE_MAX];
};

static struct {
    u64 base; /* 0 = no vsock device */
    u64 cid;
    int ok;
    struct vsock_vq vq[3]; /* RX, TX, event */
    struct vsock_conn conns[VSOCK_CONNS];
} vsock;

static u8 vsock_rx_bufs[QUEUE_SIZE][VSOCK_RX_BUF] __attribute__((aligned(4096)));
static u8 vsock_tx_buf[VSOCK_RX_BUF] __attribute__((aligned(4096)));
static u32 vsock_events[QUEUE_SIZE];

/* The agent's state, read by the io-loop (agent_on: the loop polls the agent). */
static int agent_on;
static volatile int agent_frozen;
static u64 agent_writes; /* io-loop writes completed */
static u64 agent_writes_at_freeze;

/* The io-loop completed a write: counted, so a thaw can tell whether any did while frozen. */
static void agent_wrote(void) { agent_writes++; }

static int virtio_device_id(u64 base)
{
    if (mmio_read32(base + VIRTIO_MMIO_MAGIC) != 0x74726976 ||
        mmio_read32(base + VIRTIO_MMIO_VERSION) != 2)
        return 0;
    return (int)mmio_read32(base + VIRTIO_MMIO_DEVICE_ID);
}

static void vsock_post(struct vsock_vq *q, u16 id)
{
    q->avail.ring[q->avail.idx % QUEUE_SIZE] = id;
    mb();
    q->avail.idx++;
    mb();
}

static int vsock_init(u64 base)
{
    vsock.base = base;
    mmio_write32(base + VIRTIO_MMIO_STATUS, 0);
    mmio_write32(base + VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE);
    mmio_write32(base + VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    mmio_write32(base + VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    if (!(mmio_read32(base + VIRTIO_MMIO_DEVICE_FEATURES) & 1)) {
        puts("vsock: device does not offer VIRTIO_F_VERSION_1\n");
        return 0;
    }
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES, 0);
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES, 1);
    mmio_write32(base + VIRTIO_MMIO_STATUS,
                 STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(mmio_read32(base + VIRTIO_MMIO_STATUS) & STATUS_FEATURES_OK)) {
        puts("vsock: device refused features\n");
        return 0;
    }
    vsock.cid = mmio_read32(base + VIRTIO_MMIO_CONFIG) |
                ((u64)mmio_read32(base + VIRTIO_MMIO_CONFIG + 4) << 32);
    for (u32 q = 0; q < 3; q++) {
        struct vsock_vq *vq = &vsock.vq[q];
        mmio_write32(base + VIRTIO_MMIO_QUEUE_SEL, q);
        if (mmio_read32(base + VIRTIO_MMIO_QUEUE_NUM_MAX) < QUEUE_SIZE) {
            puts("vsock: queue too small\n");
            return 0;
        }
        mmio_write32(base + VIRTIO_MMIO_QUEUE_NUM, QUEUE_SIZE);
        u64 desc = (u64)vq->desc, avail = (u64)&vq->avail, used = (u64)&vq->used;
        mmio_write32(base + VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)desc);
        mmio_write32(base + VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)(desc >> 32));
        mmio_write32(base + VIRTIO_MMIO_QUEUE_AVAIL_LOW, (u32)avail);
        mmio_write32(base + VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (u32)(avail >> 32));
        mmio_write32(base + VIRTIO_MMIO_QUEUE_USED_LOW, (u32)used);
        mmio_write32(base + VIRTIO_MMIO_QUEUE_USED_HIGH, (u32)(used >> 32));
        mmio_write32(base + VIRTIO_MMIO_QUEUE_READY, 1);
    }
    /* Every RX and event descriptor is a device-writable buffer, posted once and reposted
     * after each use. */
    for (u16 i = 0; i < QUEUE_SIZE; i++) {
        vsock.vq[0].desc[i] =
            (struct vring_desc){(u64)vsock_rx_bufs[i], VSOCK_RX_BUF, VRING_DESC_F_WRITE, 0};
        vsock_post(&vsock.vq[0], i);
        vsock.vq[2].desc[i] =
            (struct vring_desc){(u64)&vsock_events[i], sizeof(u32), VRING_DESC_F_WRITE, 0};
        vsock_post(&vsock.vq[2], i);
    }
    mmio_write32(base + VIRTIO_MMIO_STATUS,
                 STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    mmio_write32(base + VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    mmio_write32(base + VIRTIO_MMIO_QUEUE_NOTIFY, 2);
    return 1;
}

/* Sends one packet on connection `c` (or, with c == 0, an RST to `peer` from `local`). */
static void vsock_send(struct vsock_conn *c, u32 local, u32 peer, u16 op, const void *data,
                       u32 len)
{
    struct vsock_vq *q = &vsock.vq[1];
    if (len > VSOCK_RX_BUF - sizeof(struct vsock_hdr))
        len = VSOCK_RX_BUF - sizeof(struct vsock_hdr);
    if (c && op == VSOCK_OP_RW && (u32)(c->peer_buf_alloc - (c->tx_cnt - c->peer_fwd_cnt)) < len) {
        puts("vsock: no credit for an answer; dropped\n");
        return;
    }
    struct vsock_hdr h = {vsock.cid, VSOCK_HOST_CID, local, c ? c->peer_port : peer, len,
                          VSOCK_TYPE_STREAM, op, 0, VSOCK_BUF_ALLOC, c ? c->fwd_cnt : 0};
    memcpy(vsock_tx_buf, &h, sizeof(h));
    memcpy(vsock_tx_buf + sizeof(h), data, len);
    if (c) {
        c->announced = c->fwd_cnt;
        if (op == VSOCK_OP_RW)
            c->tx_cnt += len;
    }
    q->desc[0] = (struct vring_desc){(u64)vsock_tx_buf, (u32)sizeof(h) + len, 0, 0};
    vsock_post(q, 0);
    mmio_write32(vsock.base + VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    for (u64 spins = 0; *(volatile u16 *)&q->used.idx == q->last_used; spins++) {
        if (spins > VSOCK_TX_SPINS) {
            puts("vsock: the device never took a packet\n");
            return;
        }
        cpu_relax();
    }
    mb();
    q->last_used++;
}

static void agent_answer(struct vsock_conn *c, const char *text)
{
    u32 len = 0;
    while (text[len])
        len++;
    vsock_send(c, AGENT_PORT, 0, VSOCK_OP_RW, text, len);
}

static void agent_answer_number(struct vsock_conn *c, const char *prefix, u64 v)
{
    char buf[64];
    u32 n = 0;
    while (*prefix)
        buf[n++] = *prefix++;
    char digits[21];
    int i = 20;
    digits[i] = 0;
    do {
        digits[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (digits[i])
        buf[n++] = digits[i++];
    buf[n++] = '}';
    buf[n++] = '\n';
    buf[n] = 0;
    agent_answer(c, buf);
}

/* Where `needle` starts in the NUL-terminated `s`, or 0. */
static const char *find(const char *s, const char *needle)
{
    for (; *s; s++) {
        u32 i = 0;
        while (needle[i] && s[i] == needle[i])
            i++;
        if (!needle[i])
            return s;
    }
    return 0;
}

/* The io-loop's data as it stands: a digest over (disk, chunk, generation) of every chunk
 * written, which the host recomputes from a frozen image (tests/vmm_vsock.rs). */
static u64 agent_digest(struct io_loop *l, u64 *chunks_written)
{
    u64 digest = 0, written = 0;
    for (u32 slot = 0; slot < l->nusable; slot++) {
        u32 index = l->usable[slot];
        u64 chunks = loop_chunks(&disks[index]);
        for (u64 chunk = 0; chunk < chunks; chunk++) {
            u32 gen = generations[slot][chunk];
            if (!gen)
                continue;
            digest += mix64(((u64)index << 56) ^ (chunk << 24) ^ gen);
            written++;
        }
    }
    *chunks_written = written;
    return digest;
}

static void agent_freeze(struct io_loop *l, struct vsock_conn *c)
{
    if (agent_frozen) {
        agent_answer(c, "{\"error\": {\"class\": \"GenericError\", \"desc\": "
                        "\"Command guest-fsfreeze-freeze has been disabled: frozen\"}}\n");
        return;
    }
    /* As fsfreeze syncs a filesystem: what was written is on the disk before the answer. */
    for (u32 slot = 0; slot < l->nusable; slot++) {
        struct disk *d = &disks[l->usable[slot]];
        if (d->features & (1UL << VIRTIO_BLK_F_FLUSH))
            request(d, VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0);
    }
    agent_frozen = 1;
    agent_writes_at_freeze = agent_writes;
    u64 chunks;
    u64 digest = agent_digest(l, &chunks);
    puts("agent frozen writes ");
    put_dec(agent_writes);
    puts(" chunks ");
    put_dec(chunks);
    puts(" digest ");
    put_hex(digest);
    puts("\n");
    agent_answer_number(c, "{\"return\": ", l->nusable);
}

static void agent_thaw(struct io_loop *l, struct vsock_conn *c)
{
    if (!agent_frozen) {
        agent_answer(c, "{\"return\": 0}\n");
        return;
    }
    agent_frozen = 0;
    puts("agent thawed writes ");
    put_dec(agent_writes);
    puts(" frozen writes ");
    put_dec(agent_writes - agent_writes_at_freeze);
    puts("\n");
    agent_answer_number(c, "{\"return\": ", l->nusable);
}

/* One request line of the qemu-ga protocol. */
static void agent_command(struct io_loop *l, struct vsock_conn *c, const char *line)
{
    const char *execute = find(line, "\"execute\"");
    if (!execute) {
        agent_answer(c, "{\"error\": {\"class\": \"GenericError\", \"desc\": "
                        "\"Invalid JSON syntax\"}}\n");
        return;
    }
    if (find(execute, "\"guest-sync-delimited\"")) {
        const char *id = find(line, "\"id\"");
        u64 value = 0;
        if (id) {
            id += 4;
            while (*id == ' ' || *id == ':')
                id++;
            while (*id >= '0' && *id <= '9')
                value = value * 10 + (u64)(*id++ - '0');
        }
        /* The 0xFF marks where the answer starts for a client skipping stale bytes. */
        vsock_send(c, AGENT_PORT, 0, VSOCK_OP_RW, "\xff", 1);
        agent_answer_number(c, "{\"return\": ", value);
    } else if (find(execute, "\"guest-ping\"")) {
        agent_answer(c, "{\"return\": {}}\n");
    } else if (find(execute, "\"guest-fsfreeze-freeze\"")) {
        agent_freeze(l, c);
    } else if (find(execute, "\"guest-fsfreeze-thaw\"")) {
        agent_thaw(l, c);
    } else if (find(execute, "\"guest-fsfreeze-status\"")) {
        agent_answer(c, agent_frozen ? "{\"return\": \"frozen\"}\n" : "{\"return\": \"thawed\"}\n");
    } else {
        agent_answer(c, "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": "
                        "\"The command is not supported by this agent\"}}\n");
    }
}

/* Bytes from the host: 0xFF resets the line (qemu-ga's parser reset), '\n' ends a request. */
static void agent_input(struct io_loop *l, struct vsock_conn *c, const u8 *data, u32 len)
{
    for (u32 i = 0; i < len && c->used; i++) {
        u8 b = data[i];
        if (b == 0xff) {
            c->line_len = 0;
            c->overflow = 0;
        } else if (b == '\n') {
            c->line[c->line_len] = 0;
            if (c->overflow)
                agent_answer(c, "{\"error\": {\"class\": \"GenericError\", \"desc\": "
                                "\"request too long\"}}\n");
            else if (c->line_len)
                agent_command(l, c, c->line);
            c->line_len = 0;
            c->overflow = 0;
        } else if (c->line_len < AGENT_LINE_MAX - 1) {
            /* A NUL inside a request would end the string early: take it as a space. */
            c->line[c->line_len++] = b ? (char)b : ' ';
        } else {
            c->overflow = 1;
        }
    }
}

static struct vsock_conn *vsock_conn(u32 peer_port)
{
    for (u32 i = 0; i < VSOCK_CONNS; i++)
        if (vsock.conns[i].used && vsock.conns[i].peer_port == peer_port)
            return &vsock.conns[i];
    return 0;
}

/* One packet the device put in an RX buffer (`len` bytes, header included). */
static void vsock_packet(struct io_loop *l, const u8 *buf, u32 len)
{
    struct vsock_hdr h;
    if (len < sizeof(h))
        return;
    memcpy(&h, buf, sizeof(h));
    if (h.type != VSOCK_TYPE_STREAM || h.dst_cid != vsock.cid || h.src_cid != VSOCK_HOST_CID ||
        h.len > len - sizeof(h))
        return;
    struct vsock_conn *c = vsock_conn(h.src_port);
    if (c && h.dst_port != AGENT_PORT)
        c = 0;
    if (h.op == VSOCK_OP_REQUEST) {
        if (h.dst_port != AGENT_PORT) { /* nobody listens there: refused */
            vsock_send(0, h.dst_port, h.src_port, VSOCK_OP_RST, 0, 0);
            return;
        }
        /* An entry for the same host port is stale (the host gives live ones distinct
         * ports): the new connection takes it over. */
        for (u32 i = 0; i < VSOCK_CONNS && !c; i++)
            if (!vsock.conns[i].used)
                c = &vsock.conns[i];
        if (!c) {
            vsock_send(0, h.dst_port, h.src_port, VSOCK_OP_RST, 0, 0);
            return;
        }
        memset(c, 0, sizeof(*c));
        c->used = 1;
        c->peer_port = h.src_port;
        c->peer_buf_alloc = h.buf_alloc;
        c->peer_fwd_cnt = h.fwd_cnt;
        vsock_send(c, AGENT_PORT, 0, VSOCK_OP_RESPONSE, 0, 0);
        return;
    }
    if (!c) {
        if (h.op != VSOCK_OP_RST)
            vsock_send(0, h.dst_port, h.src_port, VSOCK_OP_RST, 0, 0);
        return;
    }
    c->peer_buf_alloc = h.buf_alloc;
    c->peer_fwd_cnt = h.fwd_cnt;
    switch (h.op) {
    case VSOCK_OP_RW:
        c->fwd_cnt += h.len;
        agent_input(l, c, buf + sizeof(h), h.len);
        if (c->used && c->fwd_cnt - c->announced > VSOCK_BUF_ALLOC / 2)
            vsock_send(c, AGENT_PORT, 0, VSOCK_OP_CREDIT_UPDATE, 0, 0);
        break;
    case VSOCK_OP_CREDIT_REQUEST:
        vsock_send(c, AGENT_PORT, 0, VSOCK_OP_CREDIT_UPDATE, 0, 0);
        break;
    case VSOCK_OP_SHUTDOWN: /* the host hung up: nothing more to say either */
        vsock_send(c, AGENT_PORT, 0, VSOCK_OP_RST, 0, 0);
        c->used = 0;
        break;
    case VSOCK_OP_RST:
        c->used = 0;
        break;
    case VSOCK_OP_CREDIT_UPDATE:
        break;
    default: /* RESPONSE: we never connect */
        vsock_send(c, AGENT_PORT, 0, VSOCK_OP_RST, 0, 0);
        c->used = 0;
    }
}

static void agent_listening(void)
{
    puts("agent listening cid ");
    put_dec(vsock.cid);
    puts(" port ");
    put_dec(AGENT_PORT);
    puts("\n");
}

/* Takes whatever the device delivered; answers whether the io-loop must hold its I/O. */
static int agent_step(struct io_loop *l)
{
    struct vsock_vq *rx = &vsock.vq[0], *ev = &vsock.vq[2];
    int rx_posted = 0, ev_posted = 0;
    while (*(volatile u16 *)&ev->used.idx != ev->last_used) {
        mb();
        u16 id = (u16)(ev->used.ring[ev->last_used % QUEUE_SIZE].id % QUEUE_SIZE);
        ev->last_used++;
        if (vsock_events[id] == VSOCK_EVENT_TRANSPORT_RESET) {
            /* A checkpoint was loaded: the host's connections are gone. */
            memset(vsock.conns, 0, sizeof(vsock.conns));
            puts("vsock transport reset\n");
            agent_listening();
        }
        vsock_post(ev, id);
        ev_posted = 1;
    }
    while (*(volatile u16 *)&rx->used.idx != rx->last_used) {
        mb();
        struct vring_used_elem e = rx->used.ring[rx->last_used % QUEUE_SIZE];
        rx->last_used++;
        u16 id = (u16)(e.id % QUEUE_SIZE);
        vsock_packet(l, vsock_rx_bufs[id], e.len < VSOCK_RX_BUF ? e.len : VSOCK_RX_BUF);
        vsock_post(rx, id);
        rx_posted = 1;
    }
    if (rx_posted || ev_posted) {
        u32 isr = mmio_read32(vsock.base + VIRTIO_MMIO_INTERRUPT_STATUS);
        if (isr)
            mmio_write32(vsock.base + VIRTIO_MMIO_INTERRUPT_ACK, isr);
    }
    if (rx_posted)
        mmio_write32(vsock.base + VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    if (ev_posted)
        mmio_write32(vsock.base + VIRTIO_MMIO_QUEUE_NOTIFY, 2);
    if (agent_frozen)
        cpu_relax();
    return agent_frozen;
}

static void run_io_loop(struct boot_info *info, u32 ndisks);

/* Workload `agent`: the io-loop, with the agent answering on the vsock between requests. */
static void run_agent(struct boot_info *info, u32 ndisks)
{
    if (!vsock.base || !vsock_init(vsock.base)) {
        puts("agent: no vsock device\n");
        reset();
    }
    agent_on = 1;
    agent_listening();
    run_io_loop(info, ndisks);
}

static void run_io_loop(struct boot_info *info, u32 ndisks)
{
    static struct io_loop l;
    u64 rng = info->seed | 1;
    l.seed = info->seed;
    for (u32 i = 0; i < ndisks && l.nusable < LOOP_DISKS; i++)
        if (disks[i].ok && !(disks[i].features & (1UL << VIRTIO_BLK_F_RO)) &&
            disks[i].capacity >= LOOP_CHUNK)
            l.usable[l.nusable++] = i;
    if (!l.nusable) {
        puts("io-loop: no writable disk\n");
        reset();
    }
    puts("io-loop start\n");
    u64 last_progress = rdtsc();
    for (;;) {
        /* A clone or restore reseeds: clones of one snapshot write different chunks. */
        u64 reseed = check_generation(info);
        if (reseed)
            rng = (rng ^ reseed) | 1;
        if (control_word(info) == CONTROL_FINISH)
            io_loop_finish(&l);
        if (agent_on && agent_step(&l))
            continue; /* frozen by the agent: no request until the thaw */
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        u32 slot = (u32)(rng % l.nusable);
        struct disk *d = &disks[l.usable[slot]];
        u64 chunk = (rng >> 8) % loop_chunks(d);
        if ((rng >> 40) & 1) {
            io_loop_write(&l, slot, chunk);
            agent_wrote();
        } else
            io_loop_read(&l, slot, chunk);
        l.ops++;
        if (l.ops % 1024 == 0 && d->features & (1UL << VIRTIO_BLK_F_FLUSH))
            request(d, VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0);
        /* Progress by time as well as by count: on a software-virtualised host 1024 requests
         * take half a minute, and the host wants to see I/O go on sooner. */
        u64 now = rdtsc();
        if (l.ops % 1024 == 0 || now - last_progress > PROGRESS_TICKS) {
            io_loop_progress(&l);
            last_progress = now;
        }
    }
}

/*
 * io-bench: 4 KiB requests at random 4 KiB-aligned offsets of disk 0, half reads, half writes
 * of a fixed buffer (no pattern work, so the guest's own computing stays out of the rate).
 * Every BENCH_WINDOW requests it prints
 *     io-bench ops N ticks T max M
 * T being the TSC ticks those requests took and M the longest single request, in ticks. The
 * host turns ticks into time (the guest's TSC runs at the host's rate).
 */
static void run_io_bench(struct boot_info *info, u32 ndisks)
{
    struct disk *d = &disks[0];
    if (!ndisks || !d->ok || d->features & (1UL << VIRTIO_BLK_F_RO) ||
        d->capacity < BENCH_BLOCK) {
        puts("io-bench: disk 0 is not a writable disk\n");
        reset();
    }
    u64 blocks = d->capacity / BENCH_BLOCK;
    u64 rng = info->seed | 1;
    u64 ops = 0, errors = 0;
    memset(io_buffers[0], 0x5a, BENCH_BLOCK);
    puts("io-bench start\n");
    u64 window_start = rdtsc(), longest = 0;
    for (;;) {
        if (control_word(info) == CONTROL_FINISH)
            reset();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        u64 off = (rng >> 8) % blocks * BENCH_BLOCK;
        int writing = (rng >> 40) & 1;
        u64 start = rdtsc();
        u8 status = request(d, writing ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, off / 512,
                            io_buffers[writing ? 0 : 1], BENCH_BLOCK, !writing);
        u64 end = rdtsc();
        if (status != VIRTIO_BLK_S_OK) {
            report_io_error(0, writing ? "write" : "read", off / 512, status);
            errors++;
        }
        if (end - start > longest)
            longest = end - start;
        if (++ops % BENCH_WINDOW == 0) {
            puts("io-bench ops ");
            put_dec(ops);
            puts(" ticks ");
            put_dec(end - window_start);
            puts(" max ");
            put_dec(longest);
            puts(" errors ");
            put_dec(errors);
            puts("\n");
            /* The line itself (a VM exit per byte) is not charged to the next window. */
            window_start = rdtsc();
            longest = 0;
        }
    }
}

/* ---- entry ------------------------------------------------------------------------------- */

static volatile u32 cpus_online;

void guest_main(u64 cpu, struct boot_info *info)
{
    __atomic_fetch_add(&cpus_online, 1, __ATOMIC_SEQ_CST);
    if (cpu != 0)
        halt_forever();

    if (info->magic != BOOT_INFO_MAGIC) {
        puts("micro-guest: bad boot info\n");
        reset();
    }
    u32 want = info->num_cpus < GUEST_MAX_CPUS ? info->num_cpus : GUEST_MAX_CPUS;
    /* Wait (bounded) for the other vCPUs, so the line below proves they all ran. */
    for (u64 spins = 0; cpus_online < want && spins < 200000000UL; spins++)
        cpu_relax();

    /* The disks come first in the device list, then the vsock device if any. */
    u32 ndevices = info->num_devices < MAX_DEVICES ? info->num_devices : MAX_DEVICES;
    u32 ndisks = 0;
    for (u32 i = 0; i < ndevices; i++)
        if (virtio_device_id(info->devices[i].mmio_base) == VIRTIO_ID_VSOCK)
            vsock.base = info->devices[i].mmio_base;
        else
            ndisks++;
    puts("micro-guest: cpus ");
    put_dec(cpus_online);
    puts(" disks ");
    put_dec(ndisks);
    puts("\n");

    for (u32 i = 0; i < ndisks; i++)
        disks[i].ok = disk_init(&disks[i], info->devices[i].mmio_base, i);

    switch (info->workload) {
    case WORKLOAD_COUNTER:
        run_counter(info);
        break;
    case WORKLOAD_WRITE_VERIFY:
        run_write_verify(info, ndisks);
        break;
    case WORKLOAD_IO_LOOP:
        run_io_loop(info, ndisks);
        break;
    case WORKLOAD_TOUCH:
        run_touch(info);
        break;
    case WORKLOAD_IO_BENCH:
        run_io_bench(info, ndisks);
        break;
    case WORKLOAD_AGENT:
        run_agent(info, ndisks);
        break;
    default:
        puts("micro-guest: unknown workload\n");
        reset();
    }
}
