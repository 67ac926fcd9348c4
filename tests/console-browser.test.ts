// Issue 14, the web console in a real browser: Debian's chromium, driven by
// playwright-core, against the real gateway executable, a real RabbitMQ (a
// vhost of this file's own) and two fake-driver agents whose VMs take 1.5 s
// to boot, so `creating` → `running` can be watched. A person's path through
// the page: a wrong token is refused in the alert region; the right one signs
// in; a VM is created from the form and its row turns `running` with no
// reload (the event stream); its console panel and SSH command are shown; it
// is stopped, started from elsewhere (the HTTP API, which the page only hears
// of through its event stream) and deleted. A screenshot is saved at each
// step, in a directory the test prints.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync } from "node:fs";
import { chmod, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { type Browser, chromium, type Page } from "playwright-core";
import { runTool } from "../src/hypervisor/qemu-tools.ts";
import { Agent, EXE, ensureBuilt, fakeImages, removeAll, tempDir, Vhost } from "./support/fleet.ts";

const CHROMIUM = [
  process.env.AETHERSCALE_CHROMIUM,
  "/usr/bin/chromium",
  Bun.which("chromium"),
  Bun.which("chromium-browser"),
].find((path): path is string => typeof path === "string" && path !== "" && existsSync(path));
if (CHROMIUM === undefined) {
  console.warn(
    "console-browser: SKIPPED: no chromium executable (/usr/bin/chromium, or chromium on PATH); `npm test` installs Debian's chromium through scripts/setup.sh",
  );
}
const describeWithBrowser = CHROMIUM === undefined ? describe.skip : describe;

const tag = `${process.pid}`;
const GATEWAY_USER = { name: `console-gw-${tag}`, password: "console-gw-pw" };
const OWNER = `console-alice-${tag}`;
const TOKEN = `${crypto.randomUUID().replaceAll("-", "")}${crypto.randomUUID().replaceAll("-", "")}`;
const HOSTS = ["cb1", "cb2"];
/** Kept after the run, for a person to look at. */
let SHOTS = "";

const rabbitmqctl = async (...args: string[]) => {
  const result = await runTool(["rabbitmqctl", ...args]);
  if (result.code !== 0) throw new Error(`rabbitmqctl ${args.join(" ")}: ${result.stderr}`);
};

let vhost: Vhost;
let gateway: Subprocess<"ignore", "ignore", "pipe"> | null = null;
let gatewayLog = "";
let base = "";
let browser: Browser | null = null;
let page: Page;
const agents: Agent[] = [];
const dirs: string[] = [];
const pageErrors: string[] = [];
let shot = 0;

const screenshot = async (name: string) => {
  shot += 1;
  await page.screenshot({ path: join(SHOTS, `${String(shot).padStart(2, "0")}-${name}.png`) });
};

/** The gateway's HTTP API as the test itself calls it (not the page). */
const api = async (method: string, path: string, body?: unknown) => {
  const response = await fetch(`${base}${path}`, {
    method,
    headers: { Authorization: `Bearer ${TOKEN}`, "Content-Type": "application/json" },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${text}`);
  return JSON.parse(text) as any;
};

beforeAll(async () => {
  if (CHROMIUM === undefined) return;
  SHOTS = mkdtempSync(join(tmpdir(), "aetherscale-console-screenshots-"));
  console.log(`console-browser: screenshots in ${SHOTS}`);
  await ensureBuilt();
  vhost = await Vhost.create("console");
  // The gateway acts for the token's user by impersonation, as an operator sets it up.
  await rabbitmqctl("delete_user", GATEWAY_USER.name).catch(() => undefined);
  await rabbitmqctl("add_user", GATEWAY_USER.name, GATEWAY_USER.password);
  await rabbitmqctl("set_permissions", "-p", vhost.name, GATEWAY_USER.name, ".*", ".*", ".*");
  await rabbitmqctl("set_user_tags", GATEWAY_USER.name, "impersonator");
  const images = await fakeImages(["demo", "debian-12"]);
  dirs.push(images);
  const first = 30000 + (process.pid % 200) * 20;
  agents.push(
    ...(await Promise.all(
      HOSTS.map((hostId, index) =>
        Agent.start({
          url: vhost.url,
          hostId,
          imagesDir: images,
          maxVms: 8,
          maxMemory: 8192,
          extra: [
            "--fake-boot-ms",
            "1500",
            "--port-range",
            `${first + index * 10}-${first + index * 10 + 9}`,
          ],
        }),
      ),
    )),
  );
  dirs.push(...agents.map((agent) => agent.stateDir));

  const dir = await tempDir("console-gateway");
  dirs.push(dir);
  const tokenFile = join(dir, "tokens");
  await writeFile(tokenFile, `# the browser test's one user\n${TOKEN} ${OWNER}\n`, { mode: 0o600 });
  await chmod(tokenFile, 0o600);
  const gatewayUrl = vhost.url.replace(
    "guest:guest@",
    `${encodeURIComponent(GATEWAY_USER.name)}:${GATEWAY_USER.password}@`,
  );
  // Port 0: the gateway takes a free port and says which, with --verbose (so
  // that its log, where the token must never be, holds every request).
  const proc = Bun.spawn(
    [
      EXE,
      "gateway",
      "--listen",
      "127.0.0.1:0",
      "--verbose",
      "--token-file",
      tokenFile,
      "--amqp-url",
      gatewayUrl,
    ],
    { stdin: "ignore", stdout: "ignore", stderr: "pipe" },
  );
  gateway = proc;
  void (async () => {
    const decoder = new TextDecoder();
    for await (const chunk of proc.stderr) gatewayLog += decoder.decode(chunk);
  })();
  const deadline = Date.now() + 20_000;
  for (;;) {
    const listening = /gateway listening on (http:\/\/[^\s]+)/.exec(gatewayLog);
    if (listening?.[1] !== undefined) {
      base = listening[1];
      break;
    }
    if (proc.exitCode !== null || Date.now() > deadline) {
      throw new Error(`the gateway did not start:\n${gatewayLog}`);
    }
    await Bun.sleep(50);
  }

  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  const context = await browser.newContext({ viewport: { width: 1366, height: 768 } });
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: base });
  page = await context.newPage();
  page.on("pageerror", (error) => pageErrors.push(error.message));
  page.on("console", (message) => {
    // The browser logs each error status it was answered with: the page shows those itself.
    if (message.type() === "error" && !message.text().startsWith("Failed to load resource")) {
      pageErrors.push(message.text());
    }
  });
}, 90_000);

afterAll(async () => {
  await browser?.close().catch(() => undefined);
  gateway?.kill("SIGTERM");
  await gateway?.exited;
  await Promise.all(agents.map((agent) => agent.kill()));
  if (CHROMIUM !== undefined) {
    await rabbitmqctl("delete_user", GATEWAY_USER.name).catch(() => undefined);
    await vhost?.delete();
  }
  await removeAll(...dirs);
  if (CHROMIUM !== undefined) console.log(`console-browser: ${shot} screenshots in ${SHOTS}`);
});

const row = (vmId: string) => page.locator(`#vm-rows tr[data-vm-id="${vmId}"]`);
const statusOf = (vmId: string) => row(vmId).locator(".status");

describeWithBrowser("the web console in chromium", () => {
  test("a wrong token is refused in the alert region, and nothing of the fleet is shown", async () => {
    await page.goto(base);
    await expect(page.title()).resolves.toBe("aetherscale console");
    // Keyboard only: the token field has the focus on arrival; Enter submits.
    await page.keyboard.type("not-the-token-0123456789abcdef0123456789");
    await page.keyboard.press("Enter");
    const alert = page.getByRole("alert");
    await alert.getByText(/token was not accepted/).waitFor({ timeout: 10_000 });
    expect(await alert.textContent()).toContain("401");
    expect(await page.locator("#app").isHidden()).toBe(true);
    expect(await page.evaluate(() => sessionStorage.length)).toBe(0);
    expect(page.url()).not.toContain("token");
    await screenshot("wrong-token");
  });

  test("signs in, creates a VM from the form, and watches it run, stop, start and go", async () => {
    await page.getByLabel("Access token").fill(TOKEN);
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.locator("#app").waitFor({ state: "visible", timeout: 10_000 });
    // The token is kept for this tab only, and never in the address.
    expect(await page.evaluate(() => Object.values(sessionStorage))).toEqual([TOKEN]);
    expect(page.url()).toBe(`${base}/`);
    // Both hosts with their capacity, and their images in the form.
    for (const host of HOSTS) {
      await page.locator("#host-rows th", { hasText: host }).waitFor({ timeout: 10_000 });
    }
    expect(await page.locator("#host-rows").textContent()).toContain("0 / 8192");
    expect(await page.locator("#create-image option").allTextContents()).toEqual([
      "debian-12",
      "demo",
    ]);
    await page.locator("#live.on").waitFor({ timeout: 10_000 });
    await screenshot("signed-in");

    // A marker that a reload would lose: every change below must come without one.
    await page.evaluate("window.__noReload = true");

    await page.getByLabel("Image").selectOption("demo");
    await page.getByLabel("Memory (MiB)").fill("512");
    await page.getByLabel("CPUs").fill("2");
    await page.getByLabel(/Init script/).fill("#!/bin/sh\necho hello from the console test\n");
    await page
      .getByLabel(/SSH public keys/)
      .fill(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGz2n0pJ3cUMTDZQ2lD6U9GQm6y9Gq8Rj0bL0h3kYt1c test@console",
      );
    await page.getByLabel(/Isolated/).check();
    await page.getByRole("button", { name: "Create VM" }).click();
    const created = page.locator("#vm-rows tr").first();
    await created.waitFor({ timeout: 10_000 });
    const vmId = (await created.getAttribute("data-vm-id")) as string;
    expect(vmId).toMatch(/^[a-z]{8}$/);
    expect(await created.textContent()).toContain("512 MiB");
    // The agent takes 1.5 s to boot it: the row shows it creating first, then running.
    expect(await statusOf(vmId).textContent()).toBe("creating");
    await screenshot("creating");
    await page.locator(`#vm-rows tr[data-vm-id="${vmId}"][data-status="running"]`).waitFor({
      timeout: 15_000,
    });
    await screenshot("running");
    // The hosts' capacity follows (one of the two hosts now holds 1 of its 8 VMs).
    await page.locator("#host-rows td", { hasText: "1 / 8" }).waitFor({ timeout: 10_000 });
    const record = await api("GET", `/vm/${vmId}`);
    expect(record.status).toBe("running");
    expect(record.owner).toBe(OWNER);
    expect(record.isolated).toBe(true);
    expect(record.cpus).toBe(2);

    // Its console panel: the SSH command from vm info's address and guest-22 forward.
    await row(vmId)
      .getByRole("button", { name: `Console & SSH VM ${vmId}` })
      .click();
    const ssh = (record.forwards as Array<{ host: number; guest: number }>).find(
      (forward) => forward.guest === 22,
    );
    const command = `ssh -p ${ssh?.host} debian@${record.address}`;
    await page.locator("#ssh-command", { hasText: command }).waitFor({ timeout: 10_000 });
    await page.getByRole("button", { name: "Copy" }).click();
    await page.locator("#notice", { hasText: "Copied" }).waitFor({ timeout: 5_000 });
    expect(await page.evaluate("navigator.clipboard.readText()")).toBe(command);
    // A fake VM has no serial console: the panel says so (a real one shows its tail).
    await page.waitForFunction(
      () => (globalThis as any).document.getElementById("console-log").value !== "Loading…",
      undefined,
      { timeout: 10_000 },
    );
    expect(await page.locator("#console-log").inputValue()).toContain("console");
    await screenshot("console-panel");

    // Stop from the page.
    await row(vmId)
      .getByRole("button", { name: `Stop VM ${vmId}` })
      .click();
    await page.locator(`#vm-rows tr[data-vm-id="${vmId}"][data-status="stopped"]`).waitFor({
      timeout: 15_000,
    });
    await screenshot("stopped");

    // Started elsewhere: only the event stream can tell the page.
    await api("PATCH", `/vm/${vmId}`, { status: "started" });
    await page.locator(`#vm-rows tr[data-vm-id="${vmId}"][data-status="running"]`).waitFor({
      timeout: 15_000,
    });
    await screenshot("started-elsewhere");

    // Delete asks first: cancelling keeps it, confirming (by keyboard) removes the row.
    await row(vmId)
      .getByRole("button", { name: `Delete VM ${vmId}` })
      .click();
    const dialog = page.getByRole("dialog");
    await dialog.waitFor();
    expect(await dialog.textContent()).toContain(vmId);
    await screenshot("confirm-delete");
    await dialog.getByRole("button", { name: "Cancel" }).click();
    expect(await row(vmId).count()).toBe(1);
    await row(vmId)
      .getByRole("button", { name: `Delete VM ${vmId}` })
      .click();
    await dialog.getByRole("button", { name: "Delete" }).focus();
    await page.keyboard.press("Enter");
    await row(vmId).waitFor({ state: "detached", timeout: 15_000 });
    expect(await page.locator("#detail").isHidden()).toBe(true);
    // And the hosts' capacity is given back.
    await page.locator("#host-rows td", { hasText: "1 / 8" }).waitFor({
      state: "detached",
      timeout: 10_000,
    });
    await screenshot("deleted");
    expect((await api("GET", "/vm")) as unknown[]).toEqual([]);

    expect(await page.evaluate("window.__noReload")).toBe(true);
    expect(await page.locator("#alert").textContent()).toBe("");
    expect(pageErrors).toEqual([]);
  }, 60_000);

  test("an API error is shown in the alert region", async () => {
    // More memory than any host has: the fleet says no host has capacity.
    await page.getByLabel("Memory (MiB)").fill("100000");
    await page.getByRole("button", { name: "Create VM" }).click();
    const alert = page.getByRole("alert");
    await alert.getByText(/Could not create the VM/).waitFor({ timeout: 10_000 });
    expect(await alert.textContent()).toContain("capacity");
    await screenshot("no-capacity");
    await alert.getByRole("button", { name: "Dismiss" }).click();
    expect(await page.locator("#alert").textContent()).toBe("");
    // The same page in a dark desktop theme (prefers-color-scheme).
    await page.emulateMedia({ colorScheme: "dark" });
    await screenshot("dark");
    expect(await page.evaluate("getComputedStyle(document.body).backgroundColor")).not.toBe(
      "rgb(245, 246, 248)",
    );
  });

  test("a reload keeps the tab signed in; Sign out forgets the token", async () => {
    await page.reload();
    await page.locator("#live.on").waitFor({ timeout: 10_000 });
    expect(await page.locator("#login").isHidden()).toBe(true);
    await page.getByRole("button", { name: "Sign out" }).click();
    await page.getByLabel("Access token").waitFor();
    expect(await page.evaluate("sessionStorage.length")).toBe(0);
    expect(await page.locator("#vm-rows tr").count()).toBe(0);
    await screenshot("signed-out");
    // The token went only in headers: never into the gateway's log.
    expect(gatewayLog).not.toContain(TOKEN);
  });
});
