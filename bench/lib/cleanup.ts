// Everything the bench starts or makes (agents, responders, QEMU, temp dirs,
// vhosts) registers how to undo it here; `runCleanup` undoes it all, newest
// first, on success, on failure and on SIGINT/SIGTERM.

type Undo = { label: string; undo: () => Promise<void> | void };

const stack: Undo[] = [];
let running: Promise<void> | null = null;

/** Registers an undo step; returns a function that runs it early (and only once). */
export const onCleanup = (
  label: string,
  undo: () => Promise<void> | void,
): (() => Promise<void>) => {
  const entry: Undo = { label, undo };
  if (running !== null) {
    // Cleaning up already (a signal came while a figure was still starting things): undo it now.
    void Promise.resolve()
      .then(undo)
      .catch(() => undefined);
    return async () => undefined;
  }
  stack.push(entry);
  return async () => {
    const index = stack.indexOf(entry);
    if (index === -1) return;
    stack.splice(index, 1);
    await entry.undo();
  };
};

export const runCleanup = (): Promise<void> => {
  running ??= (async () => {
    while (stack.length > 0) {
      const entry = stack.pop() as Undo;
      try {
        await withTimeout(Promise.resolve(entry.undo()), 15_000, entry.label);
      } catch (error) {
        process.stderr.write(`bench: cleanup of ${entry.label} failed: ${String(error)}\n`);
      }
    }
  })();
  return running;
};

export const withTimeout = <T>(promise: Promise<T>, ms: number, what: string): Promise<T> => {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took longer than ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
};

/** On SIGINT/SIGTERM: clean up, then exit with the signal's code. */
export const installSignalCleanup = (): void => {
  for (const [signal, code] of [
    ["SIGINT", 130],
    ["SIGTERM", 143],
  ] as const) {
    process.on(signal, () => {
      process.stderr.write(`bench: ${signal}, cleaning up\n`);
      void runCleanup().finally(() => process.exit(code));
    });
  }
};
