/**
 * Calls to the app's own backend (server/backend.ts), which holds the tokensvc API key.
 *
 * The example has no login, so the user is `?user=<id>` (default `demo-user`). A real app's backend takes the user
 * from its own session and ignores any id the browser sends.
 */
export function currentUserId(): string {
  return new URLSearchParams(window.location.search).get('user') || 'demo-user'
}

export interface RecentActivity {
  id: number
  name: string
  sport_type: string
  start_date: string
  distance: number
}

export interface SyncResult {
  athlete: { id: number; name: string }
  activities: RecentActivity[]
  synced_at: string
}

export class AppBackendError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly needsReauth = false,
    /** tokensvc's problem `code` when the backend passed one on (e.g. `athlete_capacity`). */
    readonly code?: string,
  ) {
    super(message)
  }
}

async function post<T>(path: string, body: unknown): Promise<T> {
  const response = await fetch(path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  })
  const payload = (await response.json().catch(() => ({}))) as {
    error?: string
    needs_reauth?: boolean
    code?: string
  }
  if (!response.ok) {
    throw new AppBackendError(
      response.status,
      payload.error ?? `${path} answered ${response.status}`,
      payload.needs_reauth,
      payload.code,
    )
  }
  return payload as T
}

/** Strava's consent URL for the current user, from tokensvc via the app's backend. */
export async function startConnect(redirectTo: string): Promise<string> {
  const { authorize_url } = await post<{ authorize_url: string }>('/api/connect', {
    user_id: currentUserId(),
    redirect_to: redirectTo,
  })
  return authorize_url
}

/** The app's "sync": its backend reads the athlete and their 5 newest activities through tokensvc's gateway. */
export function syncNow(): Promise<SyncResult> {
  return post<SyncResult>('/api/sync', { user_id: currentUserId() })
}

export interface ConnectCompleted {
  session_token: string
  session_expires_at: number
}

/** Confirm the `connect_id` tokensvc sent the browser back with, for the current user, through the app's backend. */
export function completeConnect(connectId: string): Promise<ConnectCompleted> {
  return post<ConnectCompleted>('/api/connect/complete', { user_id: currentUserId(), connect_id: connectId })
}
