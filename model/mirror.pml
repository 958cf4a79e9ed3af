/*
 * blkrep: Promela model of the mirror and its dirty bitmaps (DESIGN.md section 5).
 * See model/README.md for what is modelled, the abstraction and the properties.
 *
 *   spin -a model/mirror.pml && gcc -O2 -DSAFETY -o pan pan.c && ./pan -m100000
 *
 * Parameters (-D on the spin command line): N sectors (2 or 3), MAXW guest writes,
 * NC concurrent copy operations, MAXCRASH crashes.
 *
 * Deliberately broken variants, each of which the verifier must reject:
 *   -DBROKEN_CLEAR_IN_FLIGHT          the copier clears the dirty bit without checking the
 *                                     in-flight bit, i.e. even when a write landed meanwhile
 *   -DBROKEN_NO_PERSIST_BEFORE_FLUSH  a source flush is acknowledged (and the activity log
 *                                     trimmed) without writing the bitmap to stable storage
 *   -DBROKEN_OVERLAP                  two copy operations of the same chunk may be in flight
 *   -DBROKEN_NO_ACTIVITY_LOG          after a crash the persisted bitmap is trusted as is
 *   -DBROKEN_NO_TARGET_FLUSH          no target flush when the dirty count becomes zero
 *   -DBROKEN_AL_AT_ACK                the activity log records a region when the write completes
 *                                     (before it is acknowledged) instead of before it is submitted
 *   -DBROKEN_NO_PROGRESS              the copier clears the in-flight bit before testing it, so
 *                                     it never clears a dirty bit: safe, but copies forever
 *                                     (caught only by the cycle check: -DNP, ./pan -l)
 *
 * Section 5 read to the letter (a cleared bit goes to the persisted bitmap as soon as the copy's
 * write to the target is acknowledged) is -DCLEAR_BEFORE_TARGET_STABLE: wrong when the target has
 * a volatile write cache that a crash loses, right with -DTARGET_FUA (target writes are stable
 * when acknowledged: FUA, or a target without a volatile cache).
 */

#ifndef N
#define N 2
#endif
#ifndef MAXW
#define MAXW 3
#endif
#ifndef NC
#define NC 2
#endif
#ifndef MAXCRASH
#define MAXCRASH 1
#endif

/* ---- data: values are write numbers (0 = initial content, w = the w-th guest write) ---- */
byte src_cache[N];   /* source as the guest and the copier read it (volatile cache on top) */
byte src_disk[N];    /* source stable storage */
byte tgt_cache[N];   /* target as written (its volatile write cache on top) */
byte tgt_disk[N];    /* target stable storage */

/* ---- bitmaps ---- */
bit bm_mem[N];       /* persistent dirty bitmap, in-memory copy (volatile) */
bit bm_disk[N];      /* persistent dirty bitmap, on stable storage */
bit inflight[N];     /* volatile in-flight bitmap */
bit unstable[N];     /* volatile: bits cleared since the last target flush (target data maybe
                        only in the target's cache); the bitmap is persisted as bm_mem|unstable */
bit al_disk[N];      /* activity log on stable storage: regions written since the last source
                        flush; recorded before the source write is submitted */
bit copying[N];      /* volatile: a copy operation of this chunk is in flight */

/* ---- ghost state for the properties ---- */
byte src_flushed[N]; /* the source's last flushed state (the stable source after a recovery) */
byte crashes;
bit cpoint;          /* a consistency point: the dirty count reached zero and the target was
                        flushed, and no bit has been set since */

/* ---- the guest ---- */
#define G_IDLE   0
#define G_WDONE  1   /* write landed in the source, completion not yet handled */
#define G_FL_BM  2   /* source flushed, bitmap not yet persisted */
#define G_FL_AL  3   /* bitmap persisted, activity log not yet trimmed */
byte gs;             /* guest state */
byte gsec;           /* sector of the pending write */
byte writes;         /* writes issued so far */
bit since_flush;     /* a write was issued since the last flush */

/* ---- the copy operations ---- */
#define C_IDLE  0
#define C_READ  1    /* in-flight bit set, read of the source issued */
#define C_WRITE 2    /* read done, write to the target issued */
#define C_ACK   3    /* write landed in the target's cache, completion not yet handled */
#define C_FLUSH 4    /* dirty count becomes zero: target flush issued */
byte cs[NC];
byte csec[NC];
byte cval[NC];
bit  cfsnap[NC * N]; /* per copier: the `unstable` bits its pending target flush covers */

/* P holds for every sector */
#if N == 2
#define ALL(P) (P(0) && P(1))
#elif N == 3
#define ALL(P) (P(0) && P(1) && P(2))
#else
#error "N must be 2 or 3"
#endif

/* After any crash, every sector where the stable target may differ from the stable source is
 * dirty in what recovery loads: the persisted bitmap or the activity log. */
#define COVERED(i)  (tgt_disk[i] == src_disk[i] || bm_disk[i] || al_disk[i])
/* The same read against the source's last flushed state: a sector not written since the last
 * flush (not in the activity log) holds its flushed value on the source, and if the target
 * differs from it, the persisted bitmap has it dirty. */
#define FLUSHED(i)  (al_disk[i] || (src_disk[i] == src_flushed[i] && \
                                    (tgt_disk[i] == src_flushed[i] || bm_disk[i])))
#define INVARIANT   (ALL(COVERED) && ALL(FLUSHED))

/* At a consistency point (cpoint) the target's stable storage equals the source the guest
 * sees, except for a sector whose write is in flight (landed, not yet completed: either
 * content is fine). Checked in every state. */
#define SAME(i)     (tgt_disk[i] == src_cache[i] || (gs == G_WDONE && gsec == i))
#define CONSISTENT  ALL(SAME)
#define CPOINT      (!cpoint || CONSISTENT)
#define CLEAN(i)    (bm_mem[i] == 0)
#define LOADED(i)   (tgt_cache[i] == src_cache[i] || bm_mem[i])
#define CONVERGED   (ALL(CLEAN) && ALL(SAME))

#if N == 2
#define OTHERS_CLEAN(i) ((i == 0 || bm_mem[0] == 0) && (i == 1 || bm_mem[1] == 0))
#else
#define OTHERS_CLEAN(i) ((i == 0 || bm_mem[0] == 0) && (i == 1 || bm_mem[1] == 0) && \
                         (i == 2 || bm_mem[2] == 0))
#endif

/* the activity log records a region on stable storage before the write is submitted */
#ifdef BROKEN_AL_AT_ACK
#define AL_RECORD(i) skip
#define AL_AT_ACK(i) al_disk[i] = 1
#else
#define AL_RECORD(i) al_disk[i] = 1
#define AL_AT_ACK(i) skip
#endif

/* a copy operation takes only a chunk that no other operation is copying */
#ifdef BROKEN_OVERLAP
#define FREE(i) true
#else
#define FREE(i) (copying[i] == 0)
#endif

/* back to idle (forgetting the operation's registers keeps the state space small) */
#define IDLE(me) cs[me] = C_IDLE; csec[me] = 0; cval[me] = 0

/* "if the in-flight bit is still set": no write to the chunk completed since the copy started */
#if defined(BROKEN_CLEAR_IN_FLIGHT)
#define STILL_IN_FLIGHT(i) true
#elif defined(BROKEN_NO_PROGRESS)
#define STILL_IN_FLIGHT(i) false   /* the in-flight bit cleared before it is tested */
#else
#define STILL_IN_FLIGHT(i) inflight[i]
#endif
/* the dirty count becomes zero with this chunk's bit cleared: flush the target first */
#define FLUSH_NOW(i) (STILL_IN_FLIGHT(i) && OTHERS_CLEAN(i))
/* clear the persistent bit if the in-flight bit is still set; the target may hold the data in
   its cache only, so the bit stays in the persisted image until the next target flush */
#define CLEAR_IF_INFLIGHT(i) \
  if \
  :: STILL_IN_FLIGHT(i) -> bm_mem[i] = 0; unstable[i] = 1 \
  :: else \
  fi

/* ---------------------------------------------------------------------------------------- */

/* The guest: up to MAXW writes to the N sectors, each with a fresh value, and source flushes,
 * one operation at a time. A write first records its region in the activity log (stable),
 * then lands in the source's cache; its completion sets the persistent dirty bit (in memory)
 * and clears the in-flight bit. A flush makes the source stable, writes the bitmap to stable
 * storage, trims the activity log, and only then is acknowledged. */
proctype guest() {
  byte i;
end:
  do
  :: d_step { gs == G_IDLE && writes < MAXW ->
              writes++; gsec = 0; AL_RECORD(0); src_cache[0] = writes; since_flush = 1; gs = G_WDONE }
  :: d_step { gs == G_IDLE && writes < MAXW ->
              writes++; gsec = 1; AL_RECORD(1); src_cache[1] = writes; since_flush = 1; gs = G_WDONE }
#if N == 3
  :: d_step { gs == G_IDLE && writes < MAXW ->
              writes++; gsec = 2; AL_RECORD(2); src_cache[2] = writes; since_flush = 1; gs = G_WDONE }
#endif
  /* write completion: one event-loop callback, so both bitmap updates are one step */
  :: d_step { gs == G_WDONE -> AL_AT_ACK(gsec); bm_mem[gsec] = 1; inflight[gsec] = 0;
              cpoint = 0; gsec = 0; gs = G_IDLE }
  /* flush: the source device's flush completes */
  :: d_step { gs == G_IDLE && since_flush == 1 ->
              for (i : 0 .. N - 1) { src_disk[i] = src_cache[i] }; gs = G_FL_BM; i = 0 }
  /* before the flush is acknowledged, the bitmap is on stable storage */
  :: d_step { gs == G_FL_BM ->
#ifndef BROKEN_NO_PERSIST_BEFORE_FLUSH
              for (i : 0 .. N - 1) {
#ifdef CLEAR_BEFORE_TARGET_STABLE
                bm_disk[i] = bm_mem[i]
#else
                bm_disk[i] = bm_mem[i] | unstable[i]
#endif
              };
              i = 0;
#endif
              gs = G_FL_AL }
  /* then the activity log is trimmed (no write is in flight: the guest is sequential) and the
     flush is acknowledged; what it made stable is the source's new flushed state */
  :: d_step { gs == G_FL_AL ->
              for (i : 0 .. N - 1) { al_disk[i] = 0; src_flushed[i] = src_disk[i] };
              i = 0; since_flush = 0; gs = G_IDLE }
  :: gs == G_IDLE -> break
  od
}

/* One copy operation slot (NC of them run concurrently, like the 16 in flight). */
proctype copier(byte me) {
  byte i;
end:
  do
  /* pick a dirty chunk no other operation is copying; set its in-flight bit; issue the read */
  :: d_step { cs[me] == C_IDLE && bm_mem[0] && FREE(0) ->
              copying[0] = 1; inflight[0] = 1; csec[me] = 0; cs[me] = C_READ }
  :: d_step { cs[me] == C_IDLE && bm_mem[1] && FREE(1) ->
              copying[1] = 1; inflight[1] = 1; csec[me] = 1; cs[me] = C_READ }
#if N == 3
  :: d_step { cs[me] == C_IDLE && bm_mem[2] && FREE(2) ->
              copying[2] = 1; inflight[2] = 1; csec[me] = 2; cs[me] = C_READ }
#endif
  /* the read of the source completes */
  :: d_step { cs[me] == C_READ -> cval[me] = src_cache[csec[me]]; cs[me] = C_WRITE }
  /* the write reaches the target (its cache) */
  :: d_step { cs[me] == C_WRITE -> tgt_cache[csec[me]] = cval[me];
#ifdef TARGET_FUA
              tgt_disk[csec[me]] = cval[me];
#endif
              cs[me] = C_ACK }
  /* the write's completion: if the dirty count becomes zero, flush the target first;
     otherwise, if the in-flight bit is still set, clear the persistent dirty bit (remembering
     that the target may hold the data only in its cache); clear the in-flight bit */
  :: d_step { cs[me] == C_ACK ->
              if
              :: FLUSH_NOW(csec[me]) ->
#ifdef BROKEN_NO_TARGET_FLUSH
                 bm_mem[csec[me]] = 0; unstable[csec[me]] = 1;
                 inflight[csec[me]] = 0; copying[csec[me]] = 0; IDLE(me);
                 if
                 :: ALL(CLEAN) -> cpoint = 1   /* believed to be one */
                 :: else
                 fi
#else
                 for (i : 0 .. N - 1) { cfsnap[me * N + i] = unstable[i] };
                 i = 0;
                 cs[me] = C_FLUSH
#endif
              :: else ->
                 CLEAR_IF_INFLIGHT(csec[me]);
                 inflight[csec[me]] = 0; copying[csec[me]] = 0; IDLE(me)
              fi }
  /* the target flush completes: everything written before it was issued is stable (writes
     landing meanwhile may be too); then the completion handling above resumes */
  :: d_step { cs[me] == C_FLUSH ->
              for (i : 0 .. N - 1) {
                tgt_disk[i] = tgt_cache[i];
                if
                :: cfsnap[me * N + i] -> unstable[i] = 0; cfsnap[me * N + i] = 0
                :: else
                fi
              };
              i = 0;
              /* the write is stable now: no need to remember the cleared bit as unstable */
              if
              :: STILL_IN_FLIGHT(csec[me]) -> bm_mem[csec[me]] = 0
              :: else
              fi;
              inflight[csec[me]] = 0; copying[csec[me]] = 0; IDLE(me);
              /* consistency point: dirty count zero and the target flushed */
              if
              :: ALL(CLEAN) -> cpoint = 1
              :: else
              fi }
  od
}

/* The volatile caches may write back to stable storage at any moment: the source's and the
 * target's write caches, and the bitmap file (an mmap or an unsynced write of it). */
proctype writeback() {
end:
  do
  :: d_step { src_disk[0] != src_cache[0] -> src_disk[0] = src_cache[0] }
  :: d_step { src_disk[1] != src_cache[1] -> src_disk[1] = src_cache[1] }
  :: d_step { tgt_disk[0] != tgt_cache[0] -> tgt_disk[0] = tgt_cache[0] }
  :: d_step { tgt_disk[1] != tgt_cache[1] -> tgt_disk[1] = tgt_cache[1] }
#ifdef CLEAR_BEFORE_TARGET_STABLE
  :: d_step { bm_disk[0] != bm_mem[0] -> bm_disk[0] = bm_mem[0] }
  :: d_step { bm_disk[1] != bm_mem[1] -> bm_disk[1] = bm_mem[1] }
#else
  :: d_step { bm_disk[0] != (bm_mem[0] | unstable[0]) -> bm_disk[0] = bm_mem[0] | unstable[0] }
  :: d_step { bm_disk[1] != (bm_mem[1] | unstable[1]) -> bm_disk[1] = bm_mem[1] | unstable[1] }
#endif
#if N == 3
  :: d_step { src_disk[2] != src_cache[2] -> src_disk[2] = src_cache[2] }
  :: d_step { tgt_disk[2] != tgt_cache[2] -> tgt_disk[2] = tgt_cache[2] }
#ifdef CLEAR_BEFORE_TARGET_STABLE
  :: d_step { bm_disk[2] != bm_mem[2] -> bm_disk[2] = bm_mem[2] }
#else
  :: d_step { bm_disk[2] != (bm_mem[2] | unstable[2]) -> bm_disk[2] = bm_mem[2] | unstable[2] }
#endif
#endif
  od
}

/* A crash (power loss of everything) at any moment: every volatile thing is lost, operations in
 * flight vanish unacknowledged. Recovery loads the persisted bitmap and marks dirty every region
 * in the activity log, then the mirror resumes; the guest (restarted) may go on writing. */
proctype crash() {
  byte i;
  do
  :: d_step { crashes < MAXCRASH ->
              assert(INVARIANT);
              crashes++;
              for (i : 0 .. N - 1) {
                src_cache[i] = src_disk[i];
                src_flushed[i] = src_disk[i];
                tgt_cache[i] = tgt_disk[i];
#ifdef BROKEN_NO_ACTIVITY_LOG
                bm_mem[i] = bm_disk[i];
#else
                bm_mem[i] = bm_disk[i] | al_disk[i];
#endif
                inflight[i] = 0; unstable[i] = 0; copying[i] = 0
              };
              for (i : 0 .. NC - 1) { cs[i] = C_IDLE; csec[i] = 0; cval[i] = 0 };
              for (i : 0 .. NC * N - 1) { cfsnap[i] = 0 };
              i = 0;
              gs = G_IDLE; gsec = 0; cpoint = 0;
              /* what recovery loaded covers every sector where target and source differ */
              assert(ALL(LOADED)) }
  :: break   /* no (further) crash */
  od
}

/* The crash invariant holds in every reachable state (a crash may strike in any of them). */
proctype invariant() {
end:
  atomic { !INVARIANT -> assert(INVARIANT) }
}

/* So does the consistency-point property. */
proctype consistency() {
end:
  atomic { !CPOINT -> assert(CPOINT) }
}

/* Progress: every run ends (no cycles, checked separately with -DNP / ./pan -l), and when
 * nothing can move any more (no writes left, no crash left) the mirror has converged: nothing
 * dirty and the target's stable storage equal to the source. */
proctype converged() {
end:
  timeout -> assert(CONVERGED)
}

init {
  byte k;
  atomic {
    for (k : 0 .. NC - 1) { run copier(k) };
    k = 0;
    run guest();
    run writeback();
    run crash();
    run invariant();
    run consistency();
    run converged()
  }
}
