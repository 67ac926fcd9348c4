// Compiles src/main.ts into one self-contained executable, dist/aetherscale,
// with the version injected. Run with `npm run build` (Bun from node_modules).
import { chmod, mkdir, rm } from "node:fs/promises";
import { join } from "node:path";
import pkg from "../package.json" with { type: "json" };

const root = join(import.meta.dir, "..");
const outfile = join(root, "dist", "aetherscale");
const version = process.env.AETHERSCALE_VERSION || pkg.version;

await mkdir(join(root, "dist"), { recursive: true });
const started = performance.now();
const result = await Bun.build({
  entrypoints: [join(root, "src", "main.ts")],
  target: "bun",
  // Names are kept: an error's class name (BrokerError, HypervisorError) is
  // part of what a log or --verbose shows, and a renamed class prints as `Q:`.
  // Bun's keepNames does not keep them yet (oven-sh/bun#25332), so identifiers
  // are not minified at all; it costs about 0.1 MB and no start-up time.
  minify: { whitespace: true, syntax: true, identifiers: false },
  // With compile, the map is embedded (zstd-compressed, about 0.4 MB) and
  // read only when a stack trace is printed: `--verbose` then names the
  // src/….ts lines, at no start-up cost.
  sourcemap: "linked",
  // Start-up is most of a CLI run: precompiled bytecode halves it.
  bytecode: true,
  format: "esm",
  define: { AETHERSCALE_VERSION: JSON.stringify(version) },
  compile: {
    outfile,
    // The executable must behave the same wherever it is started from.
    autoloadDotenv: false,
    autoloadBunfig: false,
    autoloadTsconfig: false,
    autoloadPackageJson: false,
  },
});
if (!result.success) {
  for (const message of result.logs) console.error(message);
  throw new Error("build failed");
}
// Bun also writes the map beside the executable; the executable needs only its own copy.
await rm(`${outfile}.map`, { force: true });
await chmod(outfile, 0o755);
const size = Bun.file(outfile).size;
console.error(
  `built ${outfile} (aetherscale ${version}, ${(size / 1024 / 1024).toFixed(1)} MiB) in ${((performance.now() - started) / 1000).toFixed(1)} s`,
);
