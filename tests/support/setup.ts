// Loaded before every test file (bunfig.toml): integration tests start real
// agents, brokers and QEMU processes; a test that hangs still fails, later.
import { setDefaultTimeout } from "bun:test";

setDefaultTimeout(180_000);
