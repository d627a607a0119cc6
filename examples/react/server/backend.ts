/**
 * The example app's own backend, as a Vite plugin: the only place that holds the tokensvc API key.
 *
 * It adds four routes to both `vite` (dev) and `vite preview`:
 *   GET  /api/config           → { tokensvc_url }     read at run time, so one build serves any tokensvc
 *   POST /api/connect          → { authorize_url }    tokensvc's POST /v1/users/{id}/connect, with the API key
 *   POST /api/connect/complete → { session_token, session_expires_at, token_status }
 *                                                     confirms the `connect_id` tokensvc sent the browser back with,
 *                                                     for this app's signed-in user (POST …/connect/complete)
 *   POST /api/sync             → { athlete, activities, synced_at }
 *                                                     reads the athlete and their 5 newest activities from Strava
 *                                                     through tokensvc's gateway (GET /v1/users/{id}/strava/…):
 *                                                     this backend never holds a Strava token
 *
 * In a real application these live in your server, and the user id comes from your own login session.
 * Here the page passes `?user=` along, because the example has no login of its own.
 */
import type { IncomingMessage, ServerResponse } from 'node:http'

import type { Connect, Plugin } from 'vite'

export interface BackendConfig {
  tokensvcUrl: string
  apiKey: string
}

const USER_ID = /^[A-Za-z0-9._-]{1,64}$/
const MAX_BODY_BYTES = 16 * 1024
const UPSTREAM_TIMEOUT_MS = 15_000

export function configFromEnv(env: NodeJS.ProcessEnv = process.env): BackendConfig {
  const tokensvcUrl = (env.TOKENSVC_URL ?? 'http://127.0.0.1:8000').replace(/\/+$/, '')
  return { tokensvcUrl, apiKey: env.TOKENSVC_API_KEY ?? 'sandbox-key' }
}

class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly extra: Record<string, unknown> = {},
  ) {
    super(message)
  }
}

function send(res: ServerResponse, status: number, body: unknown): void {
  res.statusCode = status
  res.setHeader('Content-Type', 'application/json')
  res.setHeader('Cache-Control', 'no-store')
  res.end(JSON.stringify(body))
}

async function readJson(req: IncomingMessage): Promise<Record<string, unknown>> {
  if (!(req.headers['content-type'] ?? '').startsWith('application/json')) {
    throw new HttpError(415, 'send Content-Type: application/json')
  }
  const chunks: Buffer[] = []
  let size = 0
  for await (const chunk of req) {
    const buffer = chunk as Buffer
    size += buffer.length
    if (size > MAX_BODY_BYTES) throw new HttpError(413, 'request body too large')
    chunks.push(buffer)
  }
  let parsed: unknown
  try {
    parsed = JSON.parse(Buffer.concat(chunks).toString('utf8'))
  } catch {
    throw new HttpError(400, 'the body is not JSON')
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    throw new HttpError(400, 'the body must be a JSON object')
  }
  return parsed as Record<string, unknown>
}

function userIdOf(body: Record<string, unknown>): string {
  const userId = body.user_id
  if (typeof userId !== 'string' || !USER_ID.test(userId)) {
    throw new HttpError(422, 'user_id must be 1..64 characters of [A-Za-z0-9._-]')
  }
  return userId
}

/** A call to tokensvc's service API with the key; turns transport failures and problem+json into HttpErrors. */
async function tokensvc(
  config: BackendConfig,
  path: string,
  init: RequestInit = {},
  extraHeaders: Record<string, string> = {},
): Promise<Response> {
  let response: Response
  try {
    response = await fetch(`${config.tokensvcUrl}${path}`, {
      ...init,
      headers: {
        Authorization: `Bearer ${config.apiKey}`,
        Accept: 'application/json',
        ...(init.body === undefined ? {} : { 'Content-Type': 'application/json' }),
        ...extraHeaders,
      },
      signal: AbortSignal.timeout(UPSTREAM_TIMEOUT_MS),
    })
  } catch {
    throw new HttpError(502, `tokensvc is not reachable at ${config.tokensvcUrl}`)
  }
  if (!response.ok) {
    const problem = (await response.json().catch(() => ({}))) as { detail?: unknown; code?: unknown }
    const detail = typeof problem.detail === 'string' ? problem.detail : `tokensvc answered ${response.status}`
    // 409 (reauth_required, connect_mismatch, athlete_in_use, athlete_capacity) and 400 (an invalid or spent connect_id) are the
    // user's to fix by connecting again; anything else is this backend's upstream failing.
    if (response.status === 409 || response.status === 400) {
      throw new HttpError(response.status, detail, {
        code: problem.code,
        needs_reauth: problem.code === 'reauth_required',
      })
    }
    // The gateway's own refusals: a scope the user did not grant (reconnect asking for it), the app's shared
    // Strava window spent (try again after Retry-After).
    if (response.status === 403 || response.status === 429) {
      throw new HttpError(response.status, detail, {
        code: problem.code,
        retry_after: Number(response.headers.get('retry-after') ?? '') || undefined,
      })
    }
    throw new HttpError(502, detail)
  }
  return response
}

async function connect(config: BackendConfig, req: IncomingMessage): Promise<unknown> {
  const body = await readJson(req)
  const userId = userIdOf(body)
  const redirectTo = body.redirect_to
  if (redirectTo !== undefined && typeof redirectTo !== 'string') {
    throw new HttpError(422, 'redirect_to must be a string')
  }
  const response = await tokensvc(config, `/v1/users/${userId}/connect`, {
    method: 'POST',
    body: JSON.stringify(redirectTo === undefined ? {} : { redirect_to: redirectTo }),
  })
  const { authorize_url } = (await response.json()) as { authorize_url: string }
  return { authorize_url }
}

const CONNECT_ID = /^[A-Za-z0-9_-]{1,128}$/

async function completeConnect(config: BackendConfig, req: IncomingMessage): Promise<unknown> {
  const body = await readJson(req)
  // A real app takes the user from its own login session here: that is what makes the connect the signed-in
  // user's. tokensvc answers 409 connect_mismatch when the flow was started for somebody else.
  const userId = userIdOf(body)
  const connectId = body.connect_id
  if (typeof connectId !== 'string' || !CONNECT_ID.test(connectId)) {
    throw new HttpError(422, 'connect_id must be the id tokensvc sent back')
  }
  const response = await tokensvc(config, `/v1/users/${userId}/connect/complete`, {
    method: 'POST',
    body: JSON.stringify({ connect_id: connectId }),
  })
  const { session_token, session_expires_at, token_status } = (await response.json()) as Record<string, unknown>
  return { session_token, session_expires_at, token_status }
}

interface StravaActivity {
  id: number
  name: string
  sport_type: string
  start_date: string
  distance: number
}

/** A Strava API call for the user through tokensvc's gateway: tokensvc injects (and refreshes) the token. */
async function strava<T>(config: BackendConfig, userId: string, path: string): Promise<T> {
  // The user is waiting for this answer: `interactive` may spend the whole shared window (sync workers: `sync`).
  const response = await tokensvc(
    config,
    `/v1/users/${userId}/strava/${path}`,
    {},
    { 'Tokensvc-Priority': 'interactive' },
  )
  return (await response.json()) as T
}

async function sync(config: BackendConfig, req: IncomingMessage): Promise<unknown> {
  const userId = userIdOf(await readJson(req))
  const [athlete, activities] = await Promise.all([
    strava<{ id: number; firstname?: string; lastname?: string }>(config, userId, 'athlete'),
    strava<StravaActivity[]>(config, userId, 'athlete/activities?per_page=5'),
  ])
  // Only what the page shows goes back to the browser.
  return {
    athlete: { id: athlete.id, name: [athlete.firstname, athlete.lastname].filter(Boolean).join(' ') },
    activities: activities.map(({ id, name, sport_type, start_date, distance }) => ({
      id,
      name,
      sport_type,
      start_date,
      distance,
    })),
    synced_at: new Date().toISOString(),
  }
}

export function backendMiddleware(config: BackendConfig): Connect.NextHandleFunction {
  const routes: Record<string, (req: IncomingMessage) => Promise<unknown>> = {
    'GET /api/config': async () => ({ tokensvc_url: config.tokensvcUrl }),
    'POST /api/connect': (req) => connect(config, req),
    'POST /api/connect/complete': (req) => completeConnect(config, req),
    'POST /api/sync': (req) => sync(config, req),
  }
  return (req, res, next) => {
    const path = (req.url ?? '/').split('?', 1)[0]
    const route = routes[`${req.method ?? 'GET'} ${path}`]
    if (route === undefined) {
      if (path?.startsWith('/api/')) {
        send(res, 404, { error: 'no such route' })
        return
      }
      next()
      return
    }
    route(req).then(
      (body) => send(res, 200, body),
      (error: unknown) => {
        if (error instanceof HttpError) {
          send(res, error.status, { error: error.message, ...error.extra })
        } else {
          console.error('[example backend]', error)
          send(res, 500, { error: 'internal error' })
        }
      },
    )
  }
}

export function tokensvcBackend(): Plugin {
  return {
    name: 'tokensvc-example-backend',
    configureServer(server) {
      server.middlewares.use(backendMiddleware(configFromEnv()))
    },
    configurePreviewServer(server) {
      server.middlewares.use(backendMiddleware(configFromEnv()))
    },
  }
}
