// `npm run bench`: starts its own fleet in a vhost of its own, measures every
// figure of the README's performance table against a floor measured in the
// same run, prints the table (or JSON), and cleans up whatever happens.
//
//   npm run bench                      all figures, full size
//   npm run bench -- --quick           smaller N, about two minutes
//   npm run bench -- --only 1,3        some figures
//   npm run bench -- --json            the same figures as JSON on stdout
//   npm run bench -- --markdown        the table as Markdown (for the README)
//   npm run bench -- --no-build        use dist/aetherscale as it is
//   npm run bench -- --from-source     agents run as `bun src/main.ts` (readable profiles)
//   npm run bench -- --profile DIR     agents and CLI runs write CPU profiles to DIR
//                                      (profile the bench process itself with
//                                      `bun --cpu-prof-md bench/run.ts ...`)
// First, before any module of ours is evaluated: the library code the bench
// imports (client, QEMU driver) logs only warnings; the bench reports progress.
import "./lib/quiet.ts";
import { mkdirSync } from "node:fs";
import { cpus, freemem, tmpdir, totalmem } from "node:os";
import { resolve } from "node:path";
import { figure5 } from "./figures/cli.ts";
import { figure9 } from "./figures/cluster.ts";
import { figure3 } from "./figures/create.ts";
import { figure10 } from "./figures/gateway.ts";
import { figure2 } from "./figures/gather.ts";
import { figure8 } from "./figures/guest.ts";
import { figure7 } from "./figures/memory.ts";
import { figure4 } from "./figures/qemu.ts";
import { figure6 } from "./figures/scale.ts";
import { figure1 } from "./figures/targeted.ts";
import { installSignalCleanup, runCleanup } from "./lib/cleanup.ts";
import type { Context, Figure } from "./lib/context.ts";
import { ensureExecutable, fakeImages, makeVhost, snapshotExecutable } from "./lib/env.ts";
import { setFromSource, setProfileDir } from "./lib/fleet.ts";
import { runOnce } from "./lib/procs.ts";
import { markdownTable, notesText, type Row, textTable } from "./lib/report.ts";

const FIGURES: Figure[] = [
  figure1,
  figure2,
  figure3,
  figure4,
  figure5,
  figure6,
  figure7,
  figure8,
  figure9,
  figure10,
];

type Args = {
  json: boolean;
  markdown: boolean;
  quick: boolean;
  build: boolean;
  only: Set<number>;
  profile: string | null;
  fromSource: boolean;
};

const USAGE = `usage: npm run bench -- [--quick] [--only 1,3] [--json | --markdown] [--no-build] [--from-source] [--profile DIR]
  figures: ${FIGURES.map((f) => `${f.id} ${f.title}`).join("; ")}`;

const parseArgs = (argv: string[]): Args => {
  const args: Args = {
    json: false,
    markdown: false,
    quick: false,
    build: true,
    only: new Set(FIGURES.map((f) => f.id)),
    profile: null,
    fromSource: false,
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string;
    if (arg === "--json") args.json = true;
    else if (arg === "--markdown") args.markdown = true;
    else if (arg === "--quick") args.quick = true;
    else if (arg === "--no-build") args.build = false;
    else if (arg === "--from-source") args.fromSource = true;
    else if (arg === "--profile") {
      const dir = argv[++i];
      if (!dir) throw new Error("--profile takes a directory");
      args.profile = resolve(dir);
    } else if (arg === "--only" || arg.startsWith("--only=")) {
      const list = arg === "--only" ? argv[++i] : arg.slice("--only=".length);
      const ids = (list ?? "").split(",").map((s) => Number(s.trim()));
      if (ids.length === 0 || ids.some((id) => !FIGURES.some((f) => f.id === id))) {
        throw new Error(
          `--only takes figure numbers (${FIGURES.map((f) => f.id).join(", ")}) separated by commas, not "${list}"`,
        );
      }
      args.only = new Set(ids);
    } else if (arg === "--help" || arg === "-h") {
      console.log(USAGE);
      process.exit(0);
    } else {
      throw new Error(`unknown argument "${arg}"\n${USAGE}`);
    }
  }
  return args;
};

const machine = (stateFs: string) => ({
  stateFs,
  cpus: cpus().length,
  cpuModel: cpus()[0]?.model ?? "unknown",
  memoryGiB: Math.round((totalmem() / 1024 ** 3) * 10) / 10,
  freeGiB: Math.round((freemem() / 1024 ** 3) * 10) / 10,
  bun: Bun.version,
  platform: `${process.platform} ${process.arch}`,
});

const main = async (): Promise<number> => {
  const args = parseArgs(process.argv.slice(2));
  installSignalCleanup();
  if (args.profile !== null) {
    mkdirSync(args.profile, { recursive: true });
    setProfileDir(args.profile);
  }
  setFromSource(args.fromSource);
  const log = (message: string) =>
    process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${message}\n`);
  const started = performance.now();
  const rows: Row[] = [];
  const failures: { figure: number; error: string }[] = [];
  try {
    log(`executable: ${await ensureExecutable(args.build)}`);
    await snapshotExecutable();
    const vhost = await makeVhost();
    log(`vhost ${vhost.name}${args.quick ? " (quick run)" : ""}`);
    const ctx: Context = { url: vhost.url, quick: args.quick, imagesDir: await fakeImages(), log };
    for (const figure of FIGURES.filter((f) => args.only.has(f.id))) {
      const t0 = performance.now();
      log(`figure ${figure.id}: ${figure.title}`);
      try {
        const got = await figure.run(ctx);
        rows.push(...got);
        if (!args.json) process.stderr.write(`${textTable(got)}\n`);
      } catch (error) {
        const text = error instanceof Error ? (error.stack ?? error.message) : String(error);
        failures.push({ figure: figure.id, error: text });
        log(`figure ${figure.id} failed: ${text}`);
      }
      log(`figure ${figure.id} took ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    }
  } finally {
    await runCleanup();
  }
  const seconds = (performance.now() - started) / 1000;
  const fs = await runOnce(["findmnt", "-no", "FSTYPE", "-T", tmpdir()]).catch(() => null);
  const info = machine(`${fs?.stdout.trim() || "unknown"} (${tmpdir()})`);
  if (args.json) {
    console.log(
      JSON.stringify({ machine: info, quick: args.quick, seconds, rows, failures }, null, 2),
    );
  } else {
    const table = args.markdown ? markdownTable(rows) : textTable(rows);
    console.log(
      `aetherscale bench${args.quick ? " (quick)" : ""}: ${info.cpus} × ${info.cpuModel}, ${info.memoryGiB} GiB, Bun ${info.bun}, state on ${info.stateFs}, ${seconds.toFixed(0)} s`,
    );
    console.log(table);
    const notes = notesText(rows);
    if (notes) console.log(`\nnotes:\n${notes}`);
    for (const failure of failures)
      console.log(`\nfigure ${failure.figure} FAILED: ${failure.error}`);
  }
  return failures.length > 0 ? 1 : 0;
};

main().then(
  (code) => process.exit(code),
  async (error: unknown) => {
    process.stderr.write(`bench: ${error instanceof Error ? error.message : String(error)}\n`);
    await runCleanup();
    process.exit(1);
  },
);
