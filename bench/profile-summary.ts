export {};

// Summarises .cpuprofile files (from `--profile DIR`) by sample count, not by
// the time deltas: Bun charges the idle gap before a sample to whatever that
// sample caught, so an agent that mostly waits shows "seconds" in a log call.
//   bun bench/profile-summary.ts FILE.cpuprofile [FILE...] [--top N]
type Node = {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
};
type Profile = { nodes: Node[]; samples: number[] };

const args = process.argv.slice(2);
const topAt = args.indexOf("--top");
const top = topAt === -1 ? 25 : Number(args[topAt + 1]);
const files = args.filter((arg, i) => arg !== "--top" && i !== topAt + 1);

const self = new Map<string, number>();
const inclusive = new Map<string, number>();
let total = 0;
for (const file of files) {
  const profile = (await Bun.file(file).json()) as Profile;
  const byId = new Map(profile.nodes.map((node) => [node.id, node]));
  const parent = new Map<number, number>();
  for (const node of profile.nodes)
    for (const child of node.children ?? []) parent.set(child, node.id);
  const name = (node: Node) => {
    const { functionName, url, lineNumber } = node.callFrame;
    const where = url.replace(/^.*\/work\/main\//, "").replace(/^file:\/\//, "");
    return `${functionName || "(anonymous)"} ${where ? `${where}:${lineNumber + 1}` : ""}`.trim();
  };
  for (const id of profile.samples) {
    const leaf = byId.get(id);
    if (leaf === undefined) continue;
    const leafName = name(leaf);
    if (leafName.startsWith("(idle)") || leafName.startsWith("(program)")) continue;
    total++;
    self.set(leafName, (self.get(leafName) ?? 0) + 1);
    const seen = new Set<string>();
    for (let at: number | undefined = id; at !== undefined; at = parent.get(at)) {
      const node = byId.get(at);
      if (node === undefined) break;
      const n = name(node);
      if (seen.has(n)) continue;
      seen.add(n);
      inclusive.set(n, (inclusive.get(n) ?? 0) + 1);
    }
  }
}

const show = (title: string, counts: Map<string, number>) => {
  console.log(`\n${title} (of ${total} busy samples)`);
  for (const [n, count] of [...counts].sort((a, b) => b[1] - a[1]).slice(0, top)) {
    console.log(
      `${((100 * count) / total).toFixed(1).padStart(5)}%  ${String(count).padStart(6)}  ${n}`,
    );
  }
};
show("self", self);
show("inclusive", inclusive);
