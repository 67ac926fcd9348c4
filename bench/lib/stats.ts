// Percentiles and the sampling loop every latency figure uses: our side and
// its floor run in alternating blocks, so a noisy neighbour hurts both alike,
// and every loop is bounded by a count and by a time budget.

export type Summary = {
  n: number;
  p50: number;
  p99: number;
  mean: number;
  min: number;
  max: number;
};

/** Nearest-rank percentile of already sorted values. */
const rank = (sorted: number[], p: number): number => {
  if (sorted.length === 0) return Number.NaN;
  const index = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[index] as number;
};

export const summarize = (values: number[]): Summary => {
  const sorted = [...values].sort((a, b) => a - b);
  const sum = sorted.reduce((total, value) => total + value, 0);
  return {
    n: sorted.length,
    p50: rank(sorted, 50),
    p99: rank(sorted, 99),
    mean: sorted.length === 0 ? Number.NaN : sum / sorted.length,
    min: sorted[0] ?? Number.NaN,
    max: sorted.at(-1) ?? Number.NaN,
  };
};

/** A sample that timed only part of itself (say, not its clean-up) returns this. */
export type OwnTime = { ownMs: number };
export const ownTime = (ownMs: number): OwnTime => ({ ownMs });

/** The middle value (the mean of the two middle ones for an even count). */
export const median = (values: number[]): number => {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  if (sorted.length === 0) return Number.NaN;
  return sorted.length % 2 === 1
    ? (sorted[mid] as number)
    : ((sorted[mid - 1] as number) + (sorted[mid] as number)) / 2;
};

/** One measured run: timed as a whole, unless it returns an `OwnTime`. */
export type Sample = () => Promise<unknown>;

export type LoopOptions = {
  /** Samples wanted from each side. */
  count: number;
  /** Unmeasured runs of each side first. */
  warmup: number;
  /** Runs of one side before switching to the other. */
  block: number;
  /** Stop early (keeping what was measured) once this much time has passed. */
  budgetMs: number;
  /** Keep going past the budget until each side has at least this many samples. */
  minCount?: number;
};

const timed = async (sample: Sample): Promise<number> => {
  const started = performance.now();
  const result = await sample();
  const own = (result as Partial<OwnTime> | null | undefined)?.ownMs;
  return typeof own === "number" ? own : performance.now() - started;
};

/** Measures `ours` and `floor` alternately; returns their durations in ms. */
export const interleave = async (
  options: LoopOptions,
  ours: Sample,
  floor: Sample,
): Promise<{ ours: number[]; floor: number[]; cut: boolean }> => {
  const { values, cut } = await interleaveSides(options, [floor, ours]);
  return { floor: values[0] ?? [], ours: values[1] ?? [], cut };
};

/**
 * Measures any number of sides in turn, a block of each (warm-up runs too, in
 * the same order); returns each side's durations in ms, in the order given.
 */
export const interleaveSides = async (
  options: LoopOptions,
  samples: Sample[],
): Promise<{ values: number[][]; cut: boolean }> => {
  for (let i = 0; i < options.warmup; i++) {
    for (const sample of samples) await sample();
  }
  const values = samples.map(() => [] as number[]);
  const deadline = performance.now() + options.budgetMs;
  const minCount = Math.min(options.count, options.minCount ?? 3);
  let cut = false;
  let turn = 0;
  while (values.some((side) => side.length < options.count)) {
    const overBudget = performance.now() > deadline;
    if (overBudget && values.every((side) => side.length >= minCount)) {
      cut = true;
      break;
    }
    const index = turn % samples.length;
    const side = values[index] as number[];
    const sample = samples[index] as Sample;
    for (let i = 0; i < options.block && side.length < options.count; i++) {
      side.push(await timed(sample));
    }
    turn++;
  }
  return { values, cut };
};

/** Measures one side alone, bounded the same way. */
export const measure = async (options: LoopOptions, sample: Sample): Promise<number[]> => {
  for (let i = 0; i < options.warmup; i++) await sample();
  const values: number[] = [];
  const deadline = performance.now() + options.budgetMs;
  const minCount = Math.min(options.count, options.minCount ?? 3);
  while (values.length < options.count) {
    if (performance.now() > deadline && values.length >= minCount) break;
    values.push(await timed(sample));
  }
  return values;
};

export const sleep = (ms: number): Promise<void> => new Promise((done) => setTimeout(done, ms));
