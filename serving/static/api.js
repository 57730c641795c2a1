// The service's public routes, as any client calls them: the API key (when the person
// gave one) as the X-API-Key header, errors as {"error": KIND, "detail": MESSAGE}.

const KEY_STORE = "nima-api-key";

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
}

export class ApiError extends Error {
  constructor(status, kind, detail, body) {
    super(detail);
    this.status = status; // 0: no answer at all
    this.kind = kind;
    this.body = body;
  }
}

async function call(path, init = {}) {
  const headers = new Headers(init.headers || {});
  const key = apiKey();
  if (key) headers.set("X-API-Key", key);
  let response;
  try {
    response = await fetch(path, { ...init, headers });
  } catch (err) {
    throw new ApiError(0, "network", `no answer from the service (${err.message}): is serve.py still running?`, null);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null; // a proxy's HTML error page, say
  }
  if (!response.ok) {
    const kind = (body && body.error) || `http_${response.status}`;
    const detail = (body && body.detail) || `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, kind, detail, body);
  }
  return body;
}

export function getModel() {
  return call("/model");
}

// One file to /score, /explain or /enhance -> {model, result}: result is the route's entry
// for the file, with `error` set when the service could not read it (its 422 names why).
export async function postFile(route, file, query = "") {
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const body = await call(route + query, { method: "POST", body: form });
    return { model: body.model, result: body.results[0] };
  } catch (err) {
    if (err.status === 422 && err.body && Array.isArray(err.body.results) && err.body.results.length === 1) {
      return { model: null, result: err.body.results[0] };
    }
    throw err;
  }
}
