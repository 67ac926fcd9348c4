// Imported first by bench/run.ts: src/log.ts settles its level when it is
// first evaluated, from this variable.
process.env.AETHERSCALE_LOG_LEVEL ??= "quiet";
