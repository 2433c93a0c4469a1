// A dspyrt client in Node.js, written from the README's Protocol section and docs/asyncapi.yaml alone.
//
//   NATS_URL=nats://127.0.0.1:4222 DSPYRT_SUBJECT_PREFIX=dspy node client.mjs INPUT.json
//
// It discovers the agents ($SRV.INFO), asks an endpoint (and makes it refuse a request, to read an error reply),
// submits an `optimize` task with INPUT.json's input (a whole task file {"kind", "input"} or the input alone) on
// the demo model, follows the task's progress events, waits for its record to reach a final state and prints one
// JSON object on stdout: {task_id, status, record, result, progress, services, endpoint, error_reply}.
// Exit 0 when the task succeeded, 1 otherwise (its record is still printed), 2 on a usage error.

import { createHash, randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { connect, headers, RequestStrategy } from "nats";

const TERMINAL = new Set(["succeeded", "failed", "dead"]);
const encoder = new TextEncoder();
const decoder = new TextDecoder();
const json = (data) => encoder.encode(JSON.stringify(data));
const parse = (bytes) => JSON.parse(decoder.decode(bytes));

const url = process.env.NATS_URL ?? "nats://127.0.0.1:4222";
const prefix = process.env.DSPYRT_SUBJECT_PREFIX ?? "dspy";
const PREFIX = prefix.toUpperCase().replaceAll("-", "_"); // how stream and bucket names spell the prefix
const timeoutMs = Number(process.env.CLIENT_TIMEOUT_MS ?? 60000);
const identity = "node-client";

if (process.argv.length < 3) {
  console.error("usage: node client.mjs INPUT.json");
  process.exit(2);
}
const file = JSON.parse(readFileSync(process.argv[2], "utf8"));
const input = { ...(file.input ?? file), model: "demo/fewshot" };

const deadline = setTimeout(() => {
  console.error(`no final task state within ${timeoutMs} ms`);
  process.exit(1);
}, timeoutMs);

const nc = await connect({ servers: url, name: identity });
const js = nc.jetstream();

// --- discovery: scatter-gather $SRV.INFO, keep the services of this deployment ----------------------------------
const services = [];
for await (const msg of await nc.requestMany("$SRV.INFO", new Uint8Array(), {
  strategy: RequestStrategy.JitterTimer,
  jitter: 500,
  maxWait: 3000,
})) {
  const info = parse(msg.data);
  if (info.metadata?.prefix !== prefix) continue;
  services.push({
    name: info.name,
    agent: info.metadata.agent,
    id: info.id,
    endpoints: info.endpoints.map((e) => ({ name: e.name, subject: e.subject, ...e.metadata })),
  });
}
const agents = new Set(services.map((s) => s.agent));
for (const needed of ["optimizer", "switcher"]) {
  if (!agents.has(needed)) {
    console.error(`no ${needed} agent answered $SRV.INFO under prefix ${prefix} (found: ${[...agents].join(", ")})`);
    process.exit(1);
  }
}

// --- request/reply: one that answers, one that is refused --------------------------------------------------------
const requestHeaders = () => {
  const h = headers();
  h.set("Dspyrt-Client", identity);
  return h;
};
const listed = await nc.request(`${prefix}.optimizer.list`, json({}), { timeout: 5000, headers: requestHeaders() });
const endpoint = { subject: `${prefix}.optimizer.list`, reply: parse(listed.data) };

const refused = await nc.request(`${prefix}.optimizer.set_active`, json({ nmae: "typo" }), {
  timeout: 5000,
  headers: requestHeaders(),
});
const error_reply = {
  subject: `${prefix}.optimizer.set_active`,
  error: refused.headers?.get("Nats-Service-Error") ?? null,
  error_code: refused.headers?.get("Nats-Service-Error-Code") ?? null,
  body: parse(refused.data),
};

// --- submit: follow progress and the record first, then publish the envelope -------------------------------------
const kind = "optimize";
const taskId = randomUUID().replaceAll("-", "");
const progress = [];
const progressSub = nc.subscribe(`${prefix}.event.task.progress.${kind}.${taskId}`, {
  callback: (err, msg) => {
    if (!err) progress.push(parse(msg.data));
  },
});
await nc.flush(); // the subscription is in place before the task can start

const kv = await js.views.kv(`${PREFIX}_tasks`, { bindOnly: true });
const watch = await kv.watch({ key: `${kind}.${taskId}` });

const envelope = { id: taskId, kind, input, submitted_by: identity, submitted_at: Date.now() / 1000 };
const taskHeaders = requestHeaders();
const ack = await js.publish(`${prefix}.task.${kind}`, json(envelope), {
  msgID: taskId, // the Nats-Msg-Id header: equal to the envelope's id
  headers: taskHeaders,
  expect: { streamName: `${PREFIX}_TASKS` },
});
if (ack.duplicate) console.error(`task ${taskId} was already in the stream`);

let record = null;
for await (const entry of watch) {
  if (entry.operation !== "PUT") continue;
  record = parse(entry.value);
  if (TERMINAL.has(record.status)) break;
}
watch.stop();

// --- the result: in the record, or claim-checked in the object store ----------------------------------------------
let result = record.result;
if (record.status === "succeeded" && record.result_ref) {
  const ref = record.result_ref;
  const store = await js.views.os(ref.store);
  const object = await store.get(ref.name);
  const chunks = [];
  for await (const chunk of object.data) chunks.push(chunk);
  const data = Buffer.concat(chunks);
  const sha256 = createHash("sha256").update(data).digest("hex");
  if (sha256 !== ref.sha256) {
    console.error(`result object ${ref.name}: sha256 ${sha256}, the record says ${ref.sha256}`);
    process.exit(1);
  }
  result = JSON.parse(data.toString("utf8"));
}

await nc.flush(); // progress events published before the final record are in
progressSub.unsubscribe();
clearTimeout(deadline);
await nc.close();

console.log(
  JSON.stringify({ task_id: taskId, status: record.status, record, result, progress, services, endpoint, error_reply }),
);
process.exit(record.status === "succeeded" ? 0 : 1);
