// The pauses of waiting and retry loops (src/_utils.ts): a sleep that news can
// cut short (Wake, pollUntil), and the back-off every retry loop shares.
import { expect, test } from "bun:test";
import { Backoff, Deadline, pollUntil, Wake } from "../../src/_utils.ts";

test("a wake ends a sleep under way; without one the sleep runs its course", async () => {
  const wake = new Wake();
  let woken = false;
  const sleeping = wake.sleep(60_000).then(() => {
    woken = true;
  });
  await Bun.sleep(5);
  expect(woken).toBe(false);
  wake.now();
  await sleeping;
  expect(woken).toBe(true);
});

test("a wake that came while nobody slept ends the next sleep at once, and only that one", async () => {
  const wake = new Wake();
  wake.now();
  wake.now();
  await wake.sleep(60_000);
  let second = false;
  const next = wake.sleep(20).then(() => {
    second = true;
  });
  await Bun.sleep(1);
  expect(second).toBe(false);
  await next;
  expect(second).toBe(true);
});

test("pollUntil looks again as soon as it is woken", async () => {
  const wake = new Wake();
  let looks = 0;
  const done = pollUntil(() => ++looks >= 3, new Deadline(60_000), 60_000, wake);
  for (let i = 0; i < 2; i++) {
    await Bun.sleep(5);
    wake.now();
  }
  expect(await done).toBe(true);
  expect(looks).toBe(3);
});

test("a back-off doubles up to its limit, and starts over after a success", () => {
  const backoff = new Backoff(250, 1000);
  expect([backoff.next(), backoff.next(), backoff.next(), backoff.next()]).toEqual([
    250, 500, 1000, 1000,
  ]);
  backoff.reset();
  expect([backoff.next(), backoff.next()]).toEqual([250, 500]);
});
