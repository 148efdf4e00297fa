// A client in another language, written from the .proto files alone (no generated code):
// submits a job, watches it to the end and fetches its circuit.
//
//   node client.js TARGET SPEC_JSON
//
// SPEC_JSON is an edgeprune.v1.JobSpec in protobuf JSON with proto field names. Proto include
// directories come from $EDGEPRUNE_PROTO_PATH (':'-separated; the repository's protos/ plus
// the folders holding google/api, google/rpc and google/protobuf). Prints one JSON object.
'use strict';

const path = require('path');
const crypto = require('crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [target, specJson] = process.argv.slice(2);
if (!target || !specJson) {
  console.error('usage: node client.js TARGET SPEC_JSON');
  process.exit(2);
}

const protoRoot = path.resolve(__dirname, '..', '..', '..', 'protos');
const includeDirs = [protoRoot, ...(process.env.EDGEPRUNE_PROTO_PATH || '').split(':').filter(Boolean)];
const definition = protoLoader.loadSync(
  ['edgeprune/v1/job.proto', 'edgeprune/v1/circuit.proto', 'edgeprune/v1/server.proto'],
  { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true, includeDirs },
);
const v1 = grpc.loadPackageDefinition(definition).edgeprune.v1;
const credentials = grpc.credentials.createInsecure();
const jobs = new v1.JobService(target, credentials);
const circuits = new v1.CircuitService(target, credentials);
const server = new v1.ServerService(target, credentials);

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: deadline(30) }, (error, response) =>
      error ? reject(error) : resolve(response));
  });
}

function watch(name) {
  return new Promise((resolve, reject) => {
    const events = [];
    const call = jobs.WatchJob({ name, after_sequence: 0 });
    call.on('data', (event) => events.push(event));
    call.on('error', reject);
    call.on('end', () => resolve(events));
  });
}

async function main() {
  const info = await unary(server, 'GetServerInfo', {});
  const spec = JSON.parse(specJson);
  const submitted = await unary(jobs, 'SubmitJob', { spec, request_id: crypto.randomUUID() });
  const events = await watch(submitted.name);
  const job = await unary(jobs, 'GetJob', { name: submitted.name, view: 'VIEW_BASIC' });
  const circuitName = job.result ? job.result.circuits[0] : undefined;
  const circuit = circuitName
    ? await unary(circuits, 'GetCircuit', { name: circuitName, view: 'VIEW_FULL' })
    : null;
  const last = events[events.length - 1];
  console.log(JSON.stringify({
    server_version: info.version,
    job: submitted.name,
    state: job.state,
    sequences: events.map((e) => Number(e.sequence)),
    kinds: events.map((e) => e.event),
    final_state: last && last.state_change ? last.state_change.state : null,
    circuit: circuit && circuit.name,
    edge_count: circuit && Number(circuit.edge_count),
    edges: circuit ? circuit.edges.map((e) => e.name) : [],
    metrics: circuit ? circuit.metrics : {},
  }));
}

main().catch((error) => {
  console.error(`node client failed: ${error.code} ${error.details || error.message}`);
  process.exit(1);
}).finally(() => {
  jobs.close();
  circuits.close();
  server.close();
});
