// Loads a Chrome Trace Event Format file (as `turbopi trace report --chrome` writes it) into
// Chrome DevTools' own trace engine and prints, as JSON on stdout, what that engine found: for
// each process and each thread track, the slices it draws, by name, with their count, total
// duration and the `seq` argument of each.
//
//   node tools/trace_consumer/check.mjs TRACE.json
//
// The consumer is `@paulirish/trace_engine`: the trace engine of the DevTools Performance panel
// ("Load profile…"), published on npm by the DevTools team and used by Lighthouse. It runs in
// plain Node: no browser, and nothing is downloaded at run time. For a trace that is not a
// Chrome browser trace ("generic", as ours) its Renderer handler keeps every process, names each
// thread from its `thread_name` metadata event and builds that thread's tree of slices from its
// X (complete) events: the tracks and slices the Performance panel draws. A slice that overlaps
// another on its track without nesting in it is left out of that tree, so the counts printed
// here are what a reader would see, not merely what the file holds. Alternatives weighed:
// speedscope's importer ships only bundled for the browser, so reading a trace with it takes
// headless Chromium (a large system package) and scraping its page; the `perfetto` Python
// package downloads its trace processor binary at first use.
//
// Output:
//   {"consumer": "@paulirish/trace_engine 0.0.65", "generic": true,
//    "bounds_us": {"min": …, "max": …},
//    "processes": [{"pid": 1, "name": "turbo-pi", "tracks": [
//       {"tid": 3, "name": "vision", "entries": 4, "max_depth": 1,
//        "slices": [{"name": "vision", "count": 4, "total_ms": 3.2, "start_us": 512.5,
//                    "end_us": 60320.0, "seqs": [0, 1, 2, 3]}]}]}],
//    "warnings": []}
// `bounds_us` is the time window the Performance panel opens on (the engine leaves events at
// ts 0 out of it); `entries` counts the events the engine put on the track, `count` the slices
// of its tree (what is drawn), `start_us`/`end_us` the first start and last end of those.
// Tracks are listed by pid, then tid; slices by name. Exit status: 0 when the engine parsed the
// file, 2 on a usage error or a file that is not a trace, 1 when the engine failed.

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';

function fail(code, message) {
  process.stderr.write(`trace consumer: ${message}\n`);
  process.exit(code);
}

const path = process.argv[2];
if (process.argv.length !== 3 || !path || path.startsWith('-')) {
  fail(2, 'usage: node check.mjs TRACE.json');
}

let traceEvents;
try {
  const json = JSON.parse(readFileSync(path, 'utf8'));
  traceEvents = Array.isArray(json) ? json : json?.traceEvents;
} catch (e) {
  fail(2, `${path}: ${e.message}`);
}
if (!Array.isArray(traceEvents)) {
  fail(2, `${path}: no "traceEvents" array (not a Chrome Trace Event Format file)`);
}

let Trace;
let polyfillDOMRect;
let version;
try {
  // The package's own Node entry point polyfills `DOMRect`, which the engine expects of a page.
  ({ polyfillDOMRect } = await import('@paulirish/trace_engine/analyze-trace.mjs'));
  Trace = await import('@paulirish/trace_engine');
  version = createRequire(import.meta.url)('@paulirish/trace_engine/package.json').version;
} catch (e) {
  fail(
    2,
    `Chrome DevTools' trace engine is not installed (${e.message}); ` +
      'install it with `npm ci --prefix tools/trace_consumer`',
  );
}
if (typeof globalThis.DOMRect !== 'function') {
  polyfillDOMRect();
}

// The engine reports problems it tolerates on the console; keep stdout for the JSON answer.
console.log = console.info = console.debug = (...args) => console.error(...args);

let data;
try {
  const model = Trace.TraceModel.Model.createWithAllHandlers();
  await model.parse(traceEvents);
  data = model.parsedTrace()?.data;
} catch (e) {
  fail(1, `the trace engine failed on ${path}: ${e.stack ?? e}`);
}
if (!data?.Renderer || !data?.Meta) {
  fail(1, `the trace engine returned no data for ${path}`);
}

const byNumber = (a, b) => Number(a) - Number(b);

function walk(nodes, visit) {
  for (const node of nodes) {
    visit(node);
    walk(node.children ?? [], visit);
  }
}

const processes = [];
for (const pid of [...data.Renderer.processes.keys()].sort(byNumber)) {
  const proc = data.Renderer.processes.get(pid);
  const tracks = [];
  for (const tid of [...proc.threads.keys()].sort(byNumber)) {
    const thread = proc.threads.get(tid);
    const slices = new Map();
    walk(thread.tree?.roots ?? [], (node) => {
      const entry = node.entry;
      const slice = slices.get(entry.name) ?? {
        name: entry.name,
        count: 0,
        total_us: 0,
        start_us: Infinity,
        end_us: -Infinity,
        seqs: [],
      };
      slice.count += 1;
      slice.total_us += entry.dur ?? 0;
      slice.start_us = Math.min(slice.start_us, entry.ts);
      slice.end_us = Math.max(slice.end_us, entry.ts + (entry.dur ?? 0));
      if (entry.args?.seq !== undefined) {
        slice.seqs.push(entry.args.seq);
      }
      slices.set(entry.name, slice);
    });
    tracks.push({
      tid: Number(tid),
      name: thread.name ?? null,
      entries: thread.entries.length,
      max_depth: thread.tree?.maxDepth ?? 0,
      slices: [...slices.values()]
        .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
        .map(({ name, count, total_us, start_us, end_us, seqs }) => ({
          name,
          count,
          total_ms: total_us / 1000,
          start_us,
          end_us,
          seqs: seqs.sort(byNumber),
        })),
    });
  }
  processes.push({
    pid: Number(pid),
    name: data.Meta.processNames.get(pid)?.args?.name ?? null,
    tracks,
  });
}

const warnings = [];
for (const [kind, events] of data.Warnings?.perWarning ?? []) {
  warnings.push({ kind, events: events.length });
}

process.stdout.write(
  `${JSON.stringify({
    consumer: `@paulirish/trace_engine ${version}`,
    generic: data.Meta.traceIsGeneric,
    bounds_us: { min: data.Meta.traceBounds.min, max: data.Meta.traceBounds.max },
    processes,
    warnings,
  })}\n`,
);
