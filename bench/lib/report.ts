// One row of the results table, its JSON form, and the table printer.
import { type Summary, summarize } from "./stats.ts";

export type Stat =
  | { kind: "latency"; unit: "ms"; p50: number; p99: number; n: number }
  | { kind: "value"; unit: string; value: number; n: number; text?: string };

export type Row = {
  figure: string;
  what: string;
  ours: Stat;
  floor: Stat | null;
  /** ours / floor (p50 for latencies); null where there is no floor. */
  ratio: number | null;
  target: string;
  /** null: informational, no target. */
  pass: boolean | null;
  notes: string[];
};

export const latency = (values: number[]): Stat => {
  const s: Summary = summarize(values);
  return { kind: "latency", unit: "ms", p50: s.p50, p99: s.p99, n: s.n };
};

export const value = (v: number, unit: string, n = 1, text?: string): Stat => ({
  kind: "value",
  unit,
  value: v,
  n,
  ...(text === undefined ? {} : { text }),
});

const central = (stat: Stat): number => (stat.kind === "latency" ? stat.p50 : stat.value);

export const ratioOf = (ours: Stat, floor: Stat): number => central(ours) / central(floor);

/** A latency row whose target is "ours p50 at most `max` × the floor's". */
export const latencyRow = (
  figure: string,
  what: string,
  ours: number[],
  floor: number[],
  max: number | null,
  notes: string[] = [],
): Row => {
  const o = latency(ours);
  const f = latency(floor);
  const ratio = ratioOf(o, f);
  return {
    figure,
    what,
    ours: o,
    floor: f,
    ratio,
    target: max === null ? "—" : `p50 ≤ ${max}× floor`,
    pass: max === null ? null : ratio <= max,
    notes,
  };
};

const num = (v: number): string => {
  if (!Number.isFinite(v)) return "n/a";
  if (Math.abs(v) >= 100) return v.toFixed(0);
  if (Math.abs(v) >= 10) return v.toFixed(1);
  return v.toFixed(2);
};

export const show = (stat: Stat | null): string => {
  if (stat === null) return "—";
  if (stat.kind === "latency") return `${num(stat.p50)} / ${num(stat.p99)} ms`;
  return stat.text ?? `${num(stat.value)} ${stat.unit}`;
};

const runs = (row: Row): string =>
  row.floor === null ? String(row.ours.n) : `${row.ours.n} + ${row.floor.n}`;

const verdict = (pass: boolean | null): string => (pass === null ? "—" : pass ? "pass" : "MISS");

export const HEADERS = [
  "fig",
  "what",
  "ours p50 / p99 (or rate)",
  "floor p50 / p99",
  "ratio",
  "target",
  "result",
  "N (ours + floor)",
];

export const cells = (row: Row): string[] => [
  row.figure,
  row.what,
  show(row.ours),
  show(row.floor),
  row.ratio === null ? "—" : `${num(row.ratio)}×`,
  row.target,
  verdict(row.pass),
  runs(row),
];

export const textTable = (rows: Row[]): string => {
  const all = [HEADERS, ...rows.map(cells)];
  const widths = HEADERS.map((_, i) => Math.max(...all.map((r) => [...(r[i] ?? "")].length)));
  const line = (r: string[]) =>
    r
      .map((cell, i) => cell + " ".repeat((widths[i] ?? 0) - [...cell].length))
      .join("  ")
      .trimEnd();
  return [
    line(HEADERS),
    widths.map((w) => "-".repeat(w)).join("  "),
    ...rows.map((r) => line(cells(r))),
  ].join("\n");
};

export const markdownTable = (rows: Row[]): string =>
  [
    `| ${HEADERS.join(" | ")} |`,
    `|${HEADERS.map(() => "---").join("|")}|`,
    ...rows.map((row) => `| ${cells(row).join(" | ")} |`),
  ].join("\n");

export const notesText = (rows: Row[]): string =>
  rows
    .filter((row) => row.notes.length > 0)
    .map((row) => `  [${row.figure}] ${row.what}: ${row.notes.join("; ")}`)
    .join("\n");

/**
 * The informative row under a latency figure whose floor is on quorum queues:
 * that floor against the same bare path on a transient classic queue with
 * transient messages (the floor before quorum queues), i.e. what replication
 * alone costs; with ours against the classic floor as a note, the ratio the
 * figure used to show.
 */
export const replicationRow = (
  figure: string,
  ours: number[],
  quorumFloor: number[],
  classicFloor: number[],
): Row => {
  const old = ratioOf(latency(ours), latency(classicFloor));
  return latencyRow(
    figure,
    "  the floor itself: quorum + persistent, against classic + transient",
    quorumFloor,
    classicFloor,
    null,
    [`ours against the classic transient floor: ${num(old)}×`],
  );
};
