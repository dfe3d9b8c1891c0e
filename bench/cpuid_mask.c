/* A CPUID mask for one process tree: an AVX-512 host that answers CPUID like an AVX2-only one.
 *
 * Why: onnxruntime's MLAS, OpenVINO's kernels and glibc pick their instruction set from CPUID, and no environment
 * variable holds them to AVX2 (ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA reach only torch and oneDNN). Linux's
 * CPUID faulting (arch_prctl(ARCH_SET_CPUID, 0), the "cpuid_fault" flag in /proc/cpuinfo) makes every CPUID
 * instruction of this thread raise SIGSEGV; the handler below runs the real CPUID with faulting briefly off,
 * clears the AVX-512, AMX, AVX-VNNI, AVX10 and GFNI bits (what an AMD Zen 3 host reports), and steps over it.
 *
 * Loaded with LD_PRELOAD (bench/cpuid_mask.py builds it and sets the environment). Faulting is inherited by
 * threads and fork()ed children and reset by execve(), so every exec'd program of the tree loads this again
 * from the inherited LD_PRELOAD. A process that cannot turn faulting on exits at once with a message: asked to
 * be held to AVX2, it never silently runs unheld.
 *
 * The program's own SIGSEGV handlers (Python's faulthandler, for one) are kept behind this one: sigaction() and
 * signal() for SIGSEGV record them, and a SIGSEGV that is not a CPUID goes to them (or to the default action).
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static sigaction_fn real_sigaction;
static struct sigaction program_action; /* the program's own SIGSEGV action, run for every other SIGSEGV */
static atomic_ulong masked_calls;
static atomic_int installed; /* once set, the program's SIGSEGV actions are recorded, not installed */

static long set_cpuid_faulting(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

static void mask(unsigned leaf, unsigned subleaf, unsigned *a, unsigned *b, unsigned *c, unsigned *d) {
    if (leaf == 7 && subleaf == 0) {
        /* EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
        *b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) |
                (1u << 31));
        /* ECX: VBMI 1, VBMI2 6, GFNI 8, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
        *c &= ~((1u << 1) | (1u << 6) | (1u << 8) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, AVX512_FP16 23, AMX-TILE 24, AMX-INT8 25 */
        *d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (leaf == 7 && subleaf == 1) {
        /* EAX: AVX-VNNI 4, AVX512_BF16 5, AMX-FP16 21, AVX-IFMA 23; EDX: AVX10 19 */
        *a &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));
        *d &= ~(1u << 19);
    } else if (leaf == 0xd && subleaf == 0) {
        /* the XSAVE state components the CPU supports: no opmask / ZMM state (5-7), no AMX tiles (17-18) */
        *a &= ~((1u << 5) | (1u << 6) | (1u << 7) | (1u << 17) | (1u << 18));
    }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (info->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) { /* CPUID */
        unsigned leaf = (unsigned)r[REG_RAX], subleaf = (unsigned)r[REG_RCX], a, b, c, d;
        set_cpuid_faulting(0);
        __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(subleaf));
        set_cpuid_faulting(1);
        mask(leaf, subleaf, &a, &b, &c, &d);
        r[REG_RAX] = a;
        r[REG_RBX] = b;
        r[REG_RCX] = c;
        r[REG_RDX] = d;
        r[REG_RIP] += 2;
        atomic_fetch_add(&masked_calls, 1);
        return;
    }
    if (program_action.sa_flags & SA_SIGINFO && program_action.sa_sigaction) {
        program_action.sa_sigaction(sig, info, context);
        return;
    }
    if (program_action.sa_handler != SIG_DFL && program_action.sa_handler != SIG_IGN && program_action.sa_handler) {
        program_action.sa_handler(sig);
        return;
    }
    /* the default action: uninstall and return, so the faulting instruction faults again and kills */
    struct sigaction dfl = {0};
    dfl.sa_handler = SIG_DFL;
    real_sigaction(SIGSEGV, &dfl, NULL);
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV || !atomic_load(&installed)) return real_sigaction(sig, act, old);
    if (old) *old = program_action;
    if (act) program_action = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act = {0}, old;
    act.sa_handler = handler;
    sigemptyset(&act.sa_mask);
    act.sa_flags = SA_RESTART;
    if (sigaction(sig, &act, &old) != 0) return SIG_ERR;
    return old.sa_handler;
}

static void report(void) {
    if (getenv("CPUID_MASK_VERBOSE"))
        fprintf(stderr, "cpuid_mask: pid %d answered %lu CPUID calls\n", getpid(), atomic_load(&masked_calls));
}

__attribute__((constructor)) static void install(void) {
    const char *level = getenv("CPUID_MASK");
    if (!level || strcmp(level, "avx2") != 0) {
        fprintf(stderr, "cpuid_mask: CPUID_MASK=%s; the one level known is avx2\n", level ? level : "(unset)");
        _exit(70);
    }
    real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    struct sigaction act = {0};
    act.sa_sigaction = on_segv;
    act.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&act.sa_mask);
    if (real_sigaction(SIGSEGV, &act, &program_action) != 0 || set_cpuid_faulting(1) != 0) {
        fprintf(stderr, "cpuid_mask: this kernel or CPU cannot fault on CPUID (no cpuid_fault in /proc/cpuinfo?); "
                        "refusing to run unmasked\n");
        _exit(70);
    }
    atomic_store(&installed, 1);
    atexit(report);
}
