/**
 * `useStravaTokens()`: the dashboard's "refresh on mount", done once per page load.
 *
 * Every component that needs the Strava connection calls this hook, but the network call
 * (`POST <tokensvc>/proactive-token-refresh`, authenticated by tokensvc's HttpOnly session cookie) happens once:
 * the first mount starts it, and everybody shares one module-level store. `ensureFresh()` asks again on purpose
 * (the sync button does, right before syncing); calls made while one is in flight share it.
 *
 * The browser never receives a token: tokensvc's browser endpoints answer with a status only.
 */
import { useEffect, useSyncExternalStore } from 'react'

import { AppBackendError, completeConnect, startConnect } from './appBackend'
import { getConfig } from './config'

/** tokensvc's TokenStatus (CONTRACT.md): never any token material. */
export interface TokenStatus {
  user_id: string
  status: 'valid' | 'expiring_soon' | 'expired' | 'needs_reauth' | 'missing'
  expires_at: number | null
  expires_in: number | null
  athlete_id: number | null
  scopes: string[]
  last_refreshed_at: string | null
  needs_reauth: boolean
  reauth_reason: string | null
}

/**
 * What the page shows: tokensvc's status once known, plus three of its own:
 * `loading` (before the first answer), `not_connected` (no tokensvc session yet), `unavailable` (Strava or
 * tokensvc had a transient failure; the connection is kept) and `error` (anything else, e.g. tokensvc unreachable).
 */
export type StravaStatus = 'loading' | 'not_connected' | 'unavailable' | 'error' | TokenStatus['status']

export interface StravaTokensState {
  status: StravaStatus
  tokenStatus: TokenStatus | null
  needsReauth: boolean
  /** A call to tokensvc is in flight (the first one, or an `ensureFresh()`). */
  loading: boolean
  error: string | null
  /** The last call refreshed the token at Strava (rather than finding it still fresh). */
  refreshed: boolean
  message: string | null
  /** When the last answer arrived (ms since the epoch). */
  checkedAt: number | null
  /** How many times this page load has called tokensvc (1 after mounting, however many components mounted). */
  calls: number
  /** tokensvc's reconnect link from a 401; null when there is no session (then the app's own connect is used). */
  authorizeUrl: string | null
}

interface RefreshSuccess {
  success: true
  refreshed: boolean
  message: string
  token_status: TokenStatus
}

interface RefreshFailure {
  success: false
  error: string
  needs_reauth: boolean
  token_status: TokenStatus | null
  authorize_url?: string | null
}

interface Problem {
  detail?: string
}

const initialState: StravaTokensState = {
  status: 'loading',
  tokenStatus: null,
  needsReauth: false,
  loading: true,
  error: null,
  refreshed: false,
  message: null,
  checkedAt: null,
  calls: 0,
  authorizeUrl: null,
}

// --- the shared store: one per page load ---------------------------------------------------------------------

let state: StravaTokensState = initialState
let inFlight: Promise<StravaTokensState> | null = null
let started = false
const listeners = new Set<() => void>()

function setState(patch: Partial<StravaTokensState>): void {
  state = { ...state, ...patch }
  for (const listener of listeners) listener()
}

function subscribe(listener: () => void): () => void {
  listeners.add(listener)
  return () => listeners.delete(listener)
}

function getSnapshot(): StravaTokensState {
  return state
}

function interpret(httpStatus: number, body: unknown): Partial<StravaTokensState> {
  if (httpStatus === 200) {
    const ok = body as RefreshSuccess
    return {
      status: ok.token_status.status,
      tokenStatus: ok.token_status,
      needsReauth: ok.token_status.needs_reauth,
      error: null,
      refreshed: ok.refreshed,
      message: ok.message,
      authorizeUrl: null,
    }
  }
  if (httpStatus === 401 || httpStatus === 503) {
    const failed = body as RefreshFailure
    const tokenStatus = failed.token_status ?? null
    let status: StravaStatus
    if (httpStatus === 503) status = 'unavailable'
    else if (tokenStatus === null) status = 'not_connected'
    else status = tokenStatus.needs_reauth ? 'needs_reauth' : tokenStatus.status
    return {
      status,
      tokenStatus,
      needsReauth: failed.needs_reauth,
      error: failed.error,
      refreshed: false,
      message: null,
      authorizeUrl: failed.authorize_url ?? null,
    }
  }
  const problem = body as Problem
  return {
    status: 'error',
    error: problem.detail ?? `tokensvc answered ${httpStatus}`,
    refreshed: false,
    message: null,
  }
}

// --- coming back from Strava -----------------------------------------------------------------------------------

const SESSION_KEY = 'tokensvc_session_token'

/**
 * tokensvc sends the browser back with `strava=confirm&connect_id=…` and stores nothing until the app's backend
 * confirms that id for its signed-in user. The backend's answer carries a tokensvc session token for that user,
 * which this page then sends as a bearer (tokensvc sets no cookie on such a return). The URL is rewritten to
 * `strava=connected` (or `strava=failed`; `strava=capacity` when Strava refused the connect because the app is at
 * its limit of connected athletes) so a reload does not try to spend the id again.
 */
async function confirmReturn(): Promise<void> {
  const url = new URL(window.location.href)
  const connectId = url.searchParams.get('connect_id')
  if (url.searchParams.get('strava') !== 'confirm' || connectId === null) return
  url.searchParams.delete('connect_id')
  try {
    const { session_token: token } = await completeConnect(connectId)
    window.sessionStorage.setItem(SESSION_KEY, token)
    url.searchParams.set('strava', 'connected')
  } catch (error) {
    const full = error instanceof AppBackendError && error.code === 'athlete_capacity'
    url.searchParams.set('strava', full ? 'capacity' : 'failed')
  }
  window.history.replaceState(null, '', url.toString())
}

let confirmation: Promise<void> | null = null

async function callTokensvc(): Promise<Partial<StravaTokensState>> {
  try {
    confirmation ??= confirmReturn()
    await confirmation
    const { tokensvcUrl } = await getConfig()
    const sessionToken = window.sessionStorage.getItem(SESSION_KEY)
    const response = await fetch(`${tokensvcUrl}/proactive-token-refresh`, {
      method: 'POST',
      // the session: the token the app's backend got at confirmation, else tokensvc's HttpOnly cookie
      credentials: 'include',
      headers: {
        'Content-Type': 'application/json',
        ...(sessionToken === null ? {} : { Authorization: `Bearer ${sessionToken}` }),
      },
      body: '{}',
    })
    const body: unknown = await response.json().catch(() => ({}))
    return interpret(response.status, body)
  } catch {
    return { status: 'error', error: 'Could not reach tokensvc.', refreshed: false, message: null }
  }
}

/** Ask tokensvc to refresh the session user's token if it is due; concurrent callers share one request. */
export function ensureFresh(): Promise<StravaTokensState> {
  inFlight ??= (async () => {
    setState({ loading: true, calls: state.calls + 1 })
    const patch = await callTokensvc()
    setState({ ...patch, loading: false, checkedAt: Date.now() })
    inFlight = null
    return state
  })()
  return inFlight
}

/** The current page's URL without the `strava=` marker tokensvc adds when it sends the user back. */
export function currentPageUrl(): string {
  const url = new URL(window.location.href)
  url.searchParams.delete('strava')
  url.searchParams.delete('connect_id')
  return url.toString()
}

/** Send the user to Strava's consent page, coming back to this page afterwards (where the app confirms). */
export async function reconnect(): Promise<void> {
  const redirectTo = currentPageUrl()
  try {
    // Always through the app's backend, for the user signed in to the app: the connect it confirms on return is
    // then this user's (tokensvc's own reconnect link would need its cookie, which a confirmed connect never sets).
    window.location.assign(await startConnect(redirectTo))
  } catch (error) {
    setState({ error: error instanceof Error ? error.message : 'Could not start connecting to Strava.' })
  }
}

export interface UseStravaTokens extends StravaTokensState {
  reconnect: () => Promise<void>
  ensureFresh: () => Promise<StravaTokensState>
}

export function useStravaTokens(): UseStravaTokens {
  const snapshot = useSyncExternalStore(subscribe, getSnapshot)
  useEffect(() => {
    // Module-level, not per component: three components (and React's StrictMode double mount) start one call.
    if (!started) {
      started = true
      void ensureFresh()
    }
  }, [])
  return { ...snapshot, reconnect, ensureFresh }
}
