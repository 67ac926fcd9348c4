// Replaced at build time by scripts/build.ts (Bun.build `define`).
declare const AETHERSCALE_VERSION: string | undefined;

export const VERSION: string =
  typeof AETHERSCALE_VERSION === "string" ? AETHERSCALE_VERSION : "0.0.0-dev";
