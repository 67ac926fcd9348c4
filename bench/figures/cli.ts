// Figure 5: one CLI invocation end to end (`dist/aetherscale vm list --json`
// against 3 agents, the whole process), against a compiled minimal Bun
// program (bench/floor-cli.ts) making the same broadcast to the same agents.
import { join } from "node:path";
import { type Context, type Figure, pick } from "../lib/context.ts";
import { exe, prepopulatedStateDir, ROOT, tempDir, vmIds } from "../lib/env.ts";
import { profileEnv, startAgents, stopAll } from "../lib/fleet.ts";
import { runOnce } from "../lib/procs.ts";
import { latencyRow, type Row } from "../lib/report.ts";
import { interleave, ownTime } from "../lib/stats.ts";

const AGENTS = 3;
const VMS_PER_AGENT = 10;

/**
 * Compiles bench/floor-cli.ts the way scripts/build.ts compiles the real one;
 * if that build turns on bytecode (which halves a Bun program's start-up
 * here), the floor gets it too, or the ratio would flatter us.
 */
const compileFloor = async (): Promise<{ path: string; bytecode: boolean }> => {
  const outfile = join(await tempDir("floor-cli"), "floor-cli");
  const buildScript = await Bun.file(join(ROOT, "scripts", "build.ts")).text();
  const bytecode = /\bbytecode:\s*true\b/.test(buildScript);
  const result = await Bun.build({
    entrypoints: [join(ROOT, "bench", "floor-cli.ts")],
    target: "bun",
    minify: true,
    sourcemap: "none",
    ...(bytecode ? { bytecode: true, format: "esm" as const } : {}),
    compile: {
      outfile,
      autoloadDotenv: false,
      autoloadBunfig: false,
      autoloadTsconfig: false,
      autoloadPackageJson: false,
    },
  });
  if (!result.success) throw new Error(`compiling floor-cli failed: ${result.logs.join("\n")}`);
  return { path: outfile, bytecode };
};

const run = async (ctx: Context): Promise<Row[]> => {
  const { path: floorExe, bytecode } = await compileFloor();
  const taken = new Set<string>();
  const specs = await Promise.all(
    Array.from({ length: AGENTS }, async (_, i) => {
      const hostId = `f5-host-${i}`;
      return {
        url: ctx.url,
        hostId,
        imagesDir: ctx.imagesDir,
        stateDir: await prepopulatedStateDir(hostId, vmIds(VMS_PER_AGENT, taken)),
      };
    }),
  );
  const agents = await startAgents(specs);
  try {
    const ours = async () => {
      const r = await runOnce([exe(), "vm", "list", "--json", "--amqp-url", ctx.url], {
        env: profileEnv(),
      });
      const parsed = r.code === 0 ? (JSON.parse(r.stdout) as unknown[]) : [];
      if (parsed.length !== AGENTS) {
        throw new Error(`vm list: exit ${r.code}, ${parsed.length} replies: ${r.stderr.trim()}`);
      }
      return ownTime(r.ms);
    };
    const floor = async () => {
      const r = await runOnce([floorExe, ctx.url, String(AGENTS)]);
      if (r.code !== 0) throw new Error(`floor-cli: exit ${r.code}: ${r.stderr.trim()}`);
      return ownTime(r.ms);
    };
    const count = pick(ctx, 40, 20);
    ctx.log(`figure 5: ${count} process runs each side`);
    const result = await interleave(
      { count, warmup: 2, block: 5, budgetMs: pick(ctx, 90_000, 25_000), minCount: 5 },
      ours,
      floor,
    );
    const size = (path: string) => Bun.file(path).size / 1024 / 1024;
    return [
      latencyRow(
        "5",
        `\`vm list --json\` process, ${AGENTS} agents`,
        result.ours,
        result.floor,
        1.5,
        [
          `floor: compiled minimal Bun program (bytecode ${bytecode ? "on" : "off"}, as in scripts/build.ts), ${size(floorExe).toFixed(1)} MiB; ours ${size(exe()).toFixed(1)} MiB`,
          ...(result.cut ? ["cut short by the time budget"] : []),
        ],
      ),
    ];
  } finally {
    await stopAll(agents);
  }
};

export const figure5: Figure = { id: 5, title: "one CLI invocation end to end", run };
