/* A team: the threads of one OpenMP region that run many steps of work in turn (a decode step's
 * layers: csrc/decode_stack.c), each thread knowing its number and the team's size, the steps
 * divided by hand and met at team_sync, a barrier of our own.
 *
 * A region per step costs its start and its end barrier: about 2.5 us a region on the 2-vCPU
 * EPYC (an empty `omp parallel` of two threads), against 0.3 us for team_sync. 120 products
 * of a decode step's shapes, read back to back: 3.78 ms as 120 regions, 3.39 ms in one team
 * meeting at team_sync (3.27 / 3.18 ms as one product of all their rows; docs/benchmarks.md,
 * "One region for a decode step"). Kernels called by a team take its thread's share without
 * entering libgomp at all: a region opened inside the team, even of one thread, costs a team
 * of its own (an allocation and a futex) and would undo the gain.
 *
 * team_sync spins a while, then sleeps on a futex: where more threads run than cores (engines
 * side by side on two cores), a spinning thread would take the time slice of the one it waits
 * for. */
#ifndef FLEETLM_TEAM_H
#define FLEETLM_TEAM_H

#include <limits.h>
#include <stdatomic.h>
#include <stdint.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#include <sched.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

/* Spins of team_sync before it sleeps: 0.3-0.7 ms of `pause`, beyond any step's imbalance. */
#define TEAM_SPINS (1 << 14)

typedef struct {
    atomic_int arrived;    /* threads at the barrier in this generation */
    atomic_int generation; /* bumped by the last to arrive, which lets the others go on */
    atomic_int sleepers;   /* threads waiting in the kernel for the bump */
    atomic_int status;     /* the first failure of any thread, 0 while none */
} TeamShared;

typedef struct {
    int id, size; /* this thread's number, the team's size */
    TeamShared *shared;
} Team;

/* One thread alone: team_sync returns at once, a kernel's share is the whole. */
static inline Team team_of_one(TeamShared *shared)
{
    return (Team){0, 1, shared};
}

/* [*begin, *end): thread t's share of count items in contiguous runs, the first
 * count % size threads one item more. */
static inline void team_share(const Team *t, int64_t count, int64_t *begin, int64_t *end)
{
    const int64_t base = count / t->size, extra = count % t->size;
    *begin = t->id * base + (t->id < extra ? t->id : extra);
    *end = *begin + base + (t->id < extra);
}

/* Every thread's writes before it are seen by every thread after it. */
static inline void team_sync(const Team *t)
{
    if (t->size <= 1) return;
    TeamShared *s = t->shared;
    const int generation = atomic_load_explicit(&s->generation, memory_order_acquire);
    if (atomic_fetch_add(&s->arrived, 1) == t->size - 1) { /* the last: release the others */
        atomic_store_explicit(&s->arrived, 0, memory_order_relaxed);
        atomic_fetch_add(&s->generation, 1);
#if defined(__linux__)
        if (atomic_load(&s->sleepers))
            syscall(SYS_futex, &s->generation, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#endif
        return;
    }
    for (int i = 0; i < TEAM_SPINS; i++) {
        if (atomic_load_explicit(&s->generation, memory_order_acquire) != generation) return;
        CPU_RELAX();
    }
    /* sleepers before the generation is read again, the bump before sleepers is read: one
     * side sees the other (both sequentially consistent), so no thread sleeps through it */
    atomic_fetch_add(&s->sleepers, 1);
    while (atomic_load(&s->generation) == generation) {
#if defined(__linux__)
        syscall(SYS_futex, &s->generation, FUTEX_WAIT_PRIVATE, generation, NULL, NULL, 0);
#else
        sched_yield();
#endif
    }
    atomic_fetch_sub(&s->sleepers, 1);
}

/* Records a thread's failure (the first one stays); every thread reads it after a sync. */
static inline void team_fail(const Team *t, int status)
{
    int none = 0;
    if (status) atomic_compare_exchange_strong(&t->shared->status, &none, status);
}

static inline int team_status(const Team *t)
{
    return atomic_load(&t->shared->status);
}

#endif
